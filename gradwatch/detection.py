"""Pure gradient-explosion detectors, usable inside a compiled train step.

Every function is pure: state in, new state out. The caller keeps the state
in `tf.Variable`s. All math is float32 and branch-free (`tf.where`, no Python
`if` on tensors), so the functions run eagerly, inside `tf.function` and under
XLA (`jit_compile=True`) without retracing per step. They accept Python and
NumPy numbers too, and work elementwise on same-shaped tensors.

The adaptive detector (ZClip-like) keeps an exponential moving mean and
variance of log(global_norm) and puts the threshold at
`exp(mean + clip(z * std, log(min_ratio), log(max_ratio)))`: never below
`min_ratio` times the typical (geometric-mean) norm, never above `max_ratio`
times it, so a 100x spike is always caught. Until `warmup_steps` healthy steps
have been seen the threshold is `+inf` (only NaN/Inf count as explosions).
Exploded, non-finite and zero norms never enter the statistics.
"""

import dataclasses
import math
from typing import NamedTuple

import tensorflow as tf


class AdaptiveState(NamedTuple):
    """Float32 scalars: healthy steps seen, EMA mean and variance of log(norm)."""

    count: tf.Tensor
    log_norm_mean: tf.Tensor
    log_norm_var: tf.Tensor


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of the adaptive detector; the defaults come from
    `benchmarks/false_alarms.py` (healthy runs of six model families).

    Attributes:
        warmup_steps: healthy steps before any finite norm can alarm. The
            first steps of training have large, quickly falling norms.
        decay: EMA decay of the log-norm statistics (time constant
            `1 / (1 - decay)` steps); the first steps use a plain running
            average (weight `max(1 / count, 1 - decay)`), so there is no
            bias towards zero.
        z_threshold: alarm at `z_threshold` standard deviations of log(norm)
            above its mean, before clipping to the two ratios below.
        min_ratio: the threshold is never below `min_ratio` times the typical
            norm (quiet runs have tiny variance; this stops small bumps).
        max_ratio: the threshold is never above `max_ratio` times the typical
            norm; keep it well below 100 so a 100x spike is always caught.
    """

    warmup_steps: int = 50
    decay: float = 0.95
    z_threshold: float = 6.0
    min_ratio: float = 4.0
    max_ratio: float = 12.0

    def __post_init__(self):
        def check(name, valid, requirement):
            if not valid:
                value = getattr(self, name)
                raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        warmup = self.warmup_steps
        check("warmup_steps", isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0,
              "a non-negative integer")
        check("decay", number(self.decay) and 0 <= self.decay < 1, "a number in [0, 1)")
        check("z_threshold", number(self.z_threshold) and self.z_threshold > 0, "a positive number")
        check("min_ratio", number(self.min_ratio) and self.min_ratio >= 1, "a number >= 1")
        check("max_ratio", number(self.max_ratio) and self.max_ratio >= self.min_ratio,
              f"a number >= min_ratio ({self.min_ratio!r})")


def _float32(value):
    return tf.cast(value, tf.float32)


def initial_adaptive_state():
    """The state before the first step: no steps seen, zero mean and variance.

    >>> [float(value) for value in initial_adaptive_state()]
    [0.0, 0.0, 0.0]
    """
    zero = tf.zeros([], tf.float32)
    return AdaptiveState(zero, zero, zero)


def adaptive_threshold(state, config):
    """The explosion threshold in norm units: `+inf` during warm-up.

    >>> config = AdaptiveConfig(warmup_steps=2)
    >>> state = initial_adaptive_state()
    >>> float(adaptive_threshold(state, config))
    inf
    >>> for norm in [1.0, 1.0]:
    ...     state = update_adaptive_state(state, norm, False, config)
    >>> round(float(adaptive_threshold(state, config)), 4)  # no spread: min_ratio * 1.0
    4.0
    """
    count, log_norm_mean, log_norm_var = (_float32(value) for value in state)
    log_margin = tf.clip_by_value(
        config.z_threshold * tf.sqrt(log_norm_var), math.log(config.min_ratio), math.log(config.max_ratio))
    threshold = tf.exp(log_norm_mean + log_margin)
    return tf.where(count < config.warmup_steps, tf.constant(math.inf, tf.float32), threshold)


def update_adaptive_state(state, global_norm, exploded, config):
    """The state after one step; unchanged if `exploded` or the norm is not finite and positive.

    >>> config = AdaptiveConfig()
    >>> state = update_adaptive_state(initial_adaptive_state(), 2.0, False, config)
    >>> round(float(tf.exp(state.log_norm_mean)), 4), float(state.count)
    (2.0, 1.0)
    >>> same = update_adaptive_state(state, 1e6, True, config)  # exploded: ignored
    >>> float(same.count)
    1.0
    """
    count, log_norm_mean, log_norm_var = (_float32(value) for value in state)
    norm = _float32(global_norm)
    healthy = tf.logical_and(tf.logical_not(tf.cast(exploded, tf.bool)),
                             tf.logical_and(tf.math.is_finite(norm), norm > 0))
    log_norm = tf.math.log(tf.where(healthy, norm, tf.ones_like(norm)))
    weight = tf.maximum(1.0 / (count + 1.0), 1.0 - config.decay)
    deviation = log_norm - log_norm_mean
    # Welford-style update: exact running mean/variance while weight = 1/n.
    new_mean = log_norm_mean + weight * deviation
    new_var = (1.0 - weight) * (log_norm_var + weight * deviation * deviation)
    return AdaptiveState(
        tf.where(healthy, count + 1.0, count),
        tf.where(healthy, new_mean, log_norm_mean),
        tf.where(healthy, new_var, log_norm_var),
    )


def is_explosion(global_norm, threshold):
    """`not (global_norm < threshold)`: NaN and Inf always explode, and so does equality.

    >>> [bool(is_explosion(norm, 10.0)) for norm in [9.9, 10.0, float("nan"), float("inf")]]
    [False, True, True, True]
    """
    return tf.logical_not(_float32(global_norm) < _float32(threshold))

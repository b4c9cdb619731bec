"""Pure gradient-explosion detectors, usable inside a compiled train step.

State in, new state out (the caller keeps it). The maths is written once over
an `ops` namespace: `TENSOR_OPS` (the default) is float32 and branch-free, so
the functions run eagerly, in `tf.function` and under XLA (`jit_compile=True`)
without retracing per step; they accept Python and NumPy numbers and work
elementwise on same-shaped tensors. `FLOAT_OPS` runs the same maths on Python
floats (float64), for detection on the host: a few microseconds a step where
the in-graph version would add ~40 ops to every train step.

The adaptive detector (ZClip-like) keeps an exponential moving mean and
variance of log(global_norm); its threshold is
`exp(mean + clip(z * std, log(min_ratio), log(max_ratio)))`, `+inf` until
`warmup_steps` healthy steps were seen. Exploded, non-finite and zero norms
never enter the statistics.
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
    """Settings of the adaptive detector.

    The defaults come from `benchmarks/false_alarms.py` (36 healthy runs: MLPs
    with SGD+momentum and Adam, a CNN, GRU/LSTM, an attention+layernorm block,
    an embedding bag): no false alarm, highest norm/threshold 0.55, and every
    norm above 10x the typical norm alarms.

    Attributes:
        warmup_steps: healthy steps before the z-score threshold applies (50:
            the first steps have large, quickly falling norms; 25 left less
            headroom, 100 bought nothing).
        warmup_ratio: during warm-up (from the 4th healthy step on), a norm
            above `warmup_ratio` times the running typical norm alarms, so a
            run that diverges in its first steps is caught. 10, the ceiling
            of the z-score threshold: in the first 60 steps of the 36 healthy
            runs no norm exceeded 6.2 times the typical norm of the steps
            before it (headroom of the whole benchmark stays 0.56). It was 20
            before issue 13: rare corrupted targets (x60, x1000) then went
            unnoticed through the 50 warm-up steps, so `auto_clip` switched
            on only after they had done their damage (clean val MSE 2x that
            of clipping from the start; 10 switches at steps 6-16 and
            matches it, `benchmarks/auto_threshold.py`).
        decay: EMA decay of the log-norm statistics, i.e. a time constant of
            `1 / (1 - decay)` = 20 steps, so the mean follows falling/rising
            norms (0.98 lagged more, 0.9 had noisier variance). The first
            steps use the plain running average (weight `max(1/n, 1-decay)`).
        z_threshold: standard deviations of log(norm) above its mean (6; 5
            left headroom 0.71 and 4 alarmed once on a healthy LSTM/Adam run).
        min_ratio: the threshold is never below `min_ratio` times the typical
            (geometric-mean) norm, for quiet runs with tiny variance (4).
        max_ratio: the threshold is never above `max_ratio` times the typical
            norm, so a spike of 100x (> 10x) the typical norm always alarms.
            Lower catches 100x spikes of unusually small steps of very noisy
            runs too, but leaves those runs less headroom (8: 0.62).
    """

    warmup_steps: int = 50
    decay: float = 0.95
    z_threshold: float = 6.0
    min_ratio: float = 4.0
    max_ratio: float = 10.0
    warmup_ratio: float = 10.0

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
        check("warmup_ratio", number(self.warmup_ratio) and self.warmup_ratio >= 1, "a number >= 1")
        check("decay", number(self.decay) and 0 <= self.decay < 1, "a number in [0, 1)")
        check("z_threshold", number(self.z_threshold) and self.z_threshold > 0, "a positive number")
        check("min_ratio", number(self.min_ratio) and self.min_ratio >= 1, "a number >= 1")
        check("max_ratio", number(self.max_ratio) and self.max_ratio >= self.min_ratio,
              f"a number >= min_ratio ({self.min_ratio!r})")


# Healthy steps seen before even the warm-up threshold applies.
WARMUP_MIN_STEPS = 3


class TENSOR_OPS:  # noqa: N801 -- a namespace, like `math`
    """The maths on float32 tensors, branch-free (in-graph, XLA)."""

    float32 = staticmethod(lambda value: tf.cast(value, tf.float32))
    exp, sqrt, log, maximum, where = tf.exp, tf.sqrt, tf.math.log, tf.maximum, tf.where
    clip, is_finite, is_nan = tf.clip_by_value, tf.math.is_finite, tf.math.is_nan
    logical_and, logical_or, logical_not = tf.logical_and, tf.logical_or, tf.logical_not
    as_bool = staticmethod(lambda value: tf.cast(value, tf.bool))


def _exp(value):
    return math.exp(value) if value < 709.0 else math.inf


class FLOAT_OPS:  # noqa: N801
    """The same maths on Python floats (host side, float64)."""

    float32, as_bool = float, bool
    exp, sqrt, log, is_finite, is_nan = staticmethod(_exp), math.sqrt, math.log, math.isfinite, math.isnan
    maximum = staticmethod(lambda a, b: a if a >= b else b)
    where = staticmethod(lambda condition, a, b: a if condition else b)
    clip = staticmethod(lambda value, low, high: min(max(value, low), high))
    logical_and = staticmethod(lambda a, b: a and b)
    logical_or = staticmethod(lambda a, b: a or b)
    logical_not = staticmethod(lambda a: not a)


def initial_adaptive_state(ops=TENSOR_OPS):
    """The state before the first step: no steps seen, zero mean and variance.

    >>> [float(value) for value in initial_adaptive_state()]
    [0.0, 0.0, 0.0]
    """
    zero = ops.float32(0.0)
    return AdaptiveState(zero, zero, zero)


def adaptive_threshold(state, config, ops=TENSOR_OPS):
    """The explosion threshold in norm units.

    `+inf` for the first `WARMUP_MIN_STEPS` steps, then `warmup_ratio` times
    the typical norm until `warmup_steps`, then the z-score threshold.

    >>> config = AdaptiveConfig(warmup_steps=5)
    >>> state = initial_adaptive_state()
    >>> float(adaptive_threshold(state, config))
    inf
    >>> for norm in [1.0, 1.0, 1.0]:
    ...     state = update_adaptive_state(state, norm, False, config)
    >>> round(float(adaptive_threshold(state, config)), 4)  # warm-up: warmup_ratio * 1.0
    10.0
    >>> for norm in [1.0, 1.0]:
    ...     state = update_adaptive_state(state, norm, False, config)
    >>> round(float(adaptive_threshold(state, config)), 4)  # no spread: min_ratio * 1.0
    4.0
    >>> adaptive_threshold(initial_adaptive_state(FLOAT_OPS), config, FLOAT_OPS)  # on the host
    inf
    """
    count, log_norm_mean, log_norm_var = (ops.float32(value) for value in state)
    threshold = ops.exp(log_norm_mean + _log_margin(log_norm_var, config, ops))
    warmup_threshold = ops.where(count < WARMUP_MIN_STEPS, ops.float32(math.inf),
                                 ops.exp(log_norm_mean) * config.warmup_ratio)
    return ops.where(count < config.warmup_steps, warmup_threshold, threshold)


def _log_margin(log_norm_var, config, ops):
    """log(threshold / typical norm): z * std, clipped to [log(min_ratio), log(max_ratio)]."""
    return ops.clip(config.z_threshold * ops.sqrt(log_norm_var),
                    math.log(config.min_ratio), math.log(config.max_ratio))


def update_adaptive_state(state, global_norm, exploded, config, ops=TENSOR_OPS):
    """The state after one step; unchanged if `exploded` or the norm is not finite and positive.

    After warm-up, a norm below `typical / margin` (the threshold mirrored
    below the typical norm) is counted as `typical / margin`.

    >>> config = AdaptiveConfig()
    >>> state = update_adaptive_state(initial_adaptive_state(), 2.0, False, config)
    >>> round(float(tf.exp(state.log_norm_mean)), 4), float(state.count)
    (2.0, 1.0)
    >>> same = update_adaptive_state(state, 1e6, True, config)  # exploded: ignored
    >>> float(same.count)
    1.0
    """
    count, log_norm_mean, log_norm_var = (ops.float32(value) for value in state)
    norm = ops.float32(global_norm)
    healthy = ops.logical_and(ops.logical_not(ops.as_bool(exploded)),
                              ops.logical_and(ops.is_finite(norm), norm > 0))
    log_norm = ops.log(ops.where(healthy, norm, 1.0))
    # After warm-up, unusually small norms enter as if at the mirror image of
    # the threshold, so one near-zero step cannot drag the threshold down.
    log_floor = log_norm_mean - _log_margin(log_norm_var, config, ops)
    log_norm = ops.where(count < config.warmup_steps, log_norm, ops.maximum(log_norm, log_floor))
    weight = ops.maximum(1.0 / (count + 1.0), ops.float32(1.0 - config.decay))
    deviation = log_norm - log_norm_mean
    # Welford-style update: exact running mean/variance while weight = 1/n.
    new_mean = log_norm_mean + weight * deviation
    new_var = (1.0 - weight) * (log_norm_var + weight * deviation * deviation)
    return AdaptiveState(
        ops.where(healthy, count + 1.0, count),
        ops.where(healthy, new_mean, log_norm_mean),
        ops.where(healthy, new_var, log_norm_var),
    )


def is_explosion(global_norm, threshold, ops=TENSOR_OPS):
    """`not (global_norm < threshold)`: NaN and Inf always explode, and so does equality.

    Spelled `norm >= threshold or isnan(norm) or isnan(threshold)`: in graph
    mode Grappler rewrites `logical_not(a < b)` into `a >= b`, False for NaN.

    >>> [bool(is_explosion(norm, 10.0)) for norm in [9.9, 10.0, float("nan"), float("inf")]]
    [False, True, True, True]
    """
    norm, threshold = ops.float32(global_norm), ops.float32(threshold)
    return ops.logical_or(norm >= threshold, ops.logical_or(ops.is_nan(norm), ops.is_nan(threshold)))

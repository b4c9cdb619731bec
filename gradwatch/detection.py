"""Pure gradient-explosion detectors, usable inside a compiled train step.

State in, new state out (the caller keeps it). The maths is written once over
an `ops` namespace: `TENSOR_OPS` (the default) is float32 and branch-free, so
the functions run eagerly, in `tf.function` and under XLA (`jit_compile=True`)
without retracing per step; they accept Python and NumPy numbers and work
elementwise on same-shaped tensors (a window of shape `[window, *batch]`).
`FLOAT_OPS` runs the same maths on Python floats (float64), for detection on
the host: a few microseconds a step.

The adaptive detector, in a few sentences: it keeps the log-norms of the last
`window` healthy steps. The *typical norm* is their median, the *spread* the
distance from the median down to their 16th percentile (one standard
deviation for a bell-shaped distribution, measured on the lower side so that
spikes cannot widen it). A step explodes when its norm is at least
`typical * exp(z * spread)`, that factor held between `min_ratio` and
`max_ratio`. Exploded, non-finite and zero norms never enter the window, and a
median cannot be dragged by the spikes it looks for: a run whose every fourth
step is a 10x spike still sees 10x spikes. Spikes a little under the bar
are chronic trouble when they come often: once the window holds two steps
of at least 7x its median (`burst_ratio`, `burst_count`), the next one is
an explosion. Nothing is blind at the start:
until `warmup_steps` healthy steps were seen the factor is `warmup_ratio`,
so the second step is judged against the first, the third against the lower
of the two, and so on; a norm growing step after step outruns the median of
the steps before it. Only the very first step has nothing to be compared
with: it is never an explosion (unless not finite), and being one value of
the window it cannot lift the median for long.
"""

import bisect
import dataclasses
import math
from typing import NamedTuple

import tensorflow as tf


class AdaptiveState(NamedTuple):
    """`count`: healthy steps seen (float32); `log_norms`: ring buffer `[window]`
    of the last healthy log-norms (`+inf` where empty), step k in slot k % window."""

    count: tf.Tensor
    log_norms: tf.Tensor


# The spread is measured from this quantile of the window up to its median.
LOW_QUANTILE = 0.16


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Settings of the adaptive detector.

    The defaults come from `benchmarks/false_alarms.py` (healthy runs of many
    families, heavy-tailed ones included: no false alarm) and
    `benchmarks/auto_threshold.py` (corrupted data, divergence, learning-rate
    spikes: the explosions caught at their step).

    Attributes:
        window: how many recent healthy steps the median looks at (32: the
            typical norm follows a trend with a lag of ~16 steps).
        warmup_steps: healthy steps before the spread is trusted; until then
            the threshold is `warmup_ratio` times the typical norm.
        warmup_ratio: the threshold's factor over the typical norm during
            warm-up (10).
        z_threshold: spreads (lower-side standard deviations of log(norm))
            above the typical norm (8; 6 alarmed on 5 of the 92 healthy runs,
            policy-gradient and Student-t noise among them).
        min_ratio: the threshold is never below `min_ratio` times the typical
            norm, for quiet runs with tiny spread (5; 4 alarmed once with z=8).
        max_ratio: the threshold is never above `max_ratio` times the typical
            norm, so a spike of 10x the typical norm always alarms (10).
        burst_ratio, burst_count: a run whose window already holds
            `burst_count - 1` steps of at least `burst_ratio` times the typical
            norm (7 and 3) has its threshold lowered to `burst_ratio` times the
            typical norm: the next such spike is an explosion. Frequent 7-9x
            spikes are chronic trouble that a 10x bar never calls (rare
            corrupted targets in tanh nets, whose norms then creep upward);
            none of the 92 healthy runs of `benchmarks/false_alarms.py`, heavy
            tails included, held more than one such step in its window.
            `burst_count=0` turns this off.
    """

    window: int = 32
    warmup_steps: int = 32
    warmup_ratio: float = 10.0
    z_threshold: float = 8.0
    min_ratio: float = 5.0
    max_ratio: float = 10.0
    burst_ratio: float = 7.0
    burst_count: int = 3

    def __post_init__(self):
        def check(name, valid, requirement):
            if not valid:
                value = getattr(self, name)
                raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def integer(value):
            return isinstance(value, int) and not isinstance(value, bool)

        check("window", integer(self.window) and 1 <= self.window <= 4096, "an integer in [1, 4096]")
        check("warmup_steps", integer(self.warmup_steps) and 0 <= self.warmup_steps <= 256 * self.window,
              f"an integer in [0, 256 * window] (window={self.window!r})")
        check("warmup_ratio", number(self.warmup_ratio) and self.warmup_ratio >= 1, "a number >= 1")
        check("z_threshold", number(self.z_threshold) and self.z_threshold > 0, "a positive number")
        check("min_ratio", number(self.min_ratio) and self.min_ratio >= 1, "a number >= 1")
        check("max_ratio", number(self.max_ratio) and self.max_ratio >= self.min_ratio,
              f"a number >= min_ratio ({self.min_ratio!r})")
        check("burst_ratio", number(self.burst_ratio) and self.burst_ratio >= 1, "a number >= 1")
        check("burst_count", integer(self.burst_count) and self.burst_count >= 0, "a non-negative integer")


def _positions(values):
    """0, 1, ... along the window axis (axis 0), shaped to broadcast over `values`."""
    size = values.shape[0]  # static: the window
    return tf.reshape(tf.range(size, dtype=tf.float32), [size] + [1] * (values.shape.rank - 1))


class TENSOR_OPS:  # noqa: N801 -- a namespace, like `math`
    """The maths on float32 tensors, branch-free (in-graph, XLA)."""

    float32 = staticmethod(lambda value: tf.cast(value, tf.float32))
    exp, sqrt, log, maximum, minimum, where = tf.exp, tf.sqrt, tf.math.log, tf.maximum, tf.minimum, tf.where
    clip, is_finite, is_nan, floor = tf.clip_by_value, tf.math.is_finite, tf.math.is_nan, tf.floor
    logical_and, logical_or, logical_not = tf.logical_and, tf.logical_or, tf.logical_not
    as_bool = staticmethod(lambda value: tf.cast(value, tf.bool))
    sort = staticmethod(lambda values: tf.sort(tf.convert_to_tensor(values, tf.float32), axis=0))
    largest = staticmethod(lambda values, size: tf.reduce_max(tf.convert_to_tensor(values, tf.float32)[:size], axis=0))
    equal = tf.equal

    @staticmethod
    def full(size, value):
        return tf.fill([size], tf.constant(value, tf.float32))

    @staticmethod
    def count_at_least(values, floor):
        """How many finite entries of `values` are `>= floor` (along axis 0)."""
        values = tf.convert_to_tensor(values, tf.float32)
        return tf.reduce_sum(tf.cast(tf.logical_and(values >= floor, tf.math.is_finite(values)), tf.float32), axis=0)

    @staticmethod
    def pick(values, index):
        """`values[index]` along axis 0 (`index` a float tensor, per batch entry); 0 if out of range."""
        values = tf.convert_to_tensor(values, tf.float32)
        chosen = tf.where(tf.equal(_positions(values), index), values, tf.zeros_like(values))
        return tf.reduce_sum(chosen, axis=0)

    @staticmethod
    def put(values, index, value, condition):
        """`values` with `values[index] = value` where `condition`."""
        values = tf.convert_to_tensor(values, tf.float32)
        return tf.where(tf.logical_and(tf.equal(_positions(values), index), condition), value, values)


def _exp(value):
    return math.exp(value) if value < 709.0 else math.inf


class FLOAT_OPS:  # noqa: N801
    """The same maths on Python floats (host side, float64); the window is a tuple."""

    float32, as_bool = float, bool
    exp, sqrt, log, is_finite, is_nan, floor = staticmethod(_exp), math.sqrt, math.log, math.isfinite, math.isnan, \
        math.floor
    maximum = staticmethod(lambda a, b: a if a >= b else b)
    minimum = staticmethod(lambda a, b: a if a <= b else b)
    where = staticmethod(lambda condition, a, b: a if condition else b)
    clip = staticmethod(lambda value, low, high: min(max(value, low), high))
    logical_and = staticmethod(lambda a, b: a and b)
    logical_or = staticmethod(lambda a, b: a or b)
    logical_not = staticmethod(lambda a: not a)
    sort = staticmethod(lambda values: tuple(sorted(values)))
    largest = staticmethod(lambda values, size: max(values[:size]))
    equal = staticmethod(lambda a, b: a == b)
    full = staticmethod(lambda size, value: (float(value),) * size)
    count_at_least = staticmethod(lambda values, floor: float(sum(1 for v in values if floor <= v < math.inf)))
    pick = staticmethod(lambda values, index: values[int(index)] if 0 <= index < len(values) else 0.0)

    @staticmethod
    def put(values, index, value, condition):
        if not condition:
            return values
        index = int(index)
        return values[:index] + (float(value),) + values[index + 1:]


def initial_adaptive_state(config=None, ops=TENSOR_OPS):
    """The state before the first step: no steps seen, an empty window.

    >>> state = initial_adaptive_state(AdaptiveConfig(window=4))
    >>> float(state.count), state.log_norms.numpy().tolist()
    (0.0, [inf, inf, inf, inf])
    """
    config = config or AdaptiveConfig()
    return AdaptiveState(ops.float32(0.0), ops.full(config.window, math.inf))


def typical_and_spread(state, config, ops=TENSOR_OPS):
    """`(log typical norm, spread)`: the (lower) median of the window's
    log-norms and the distance from its 16th percentile up to it (nearest
    ranks). Meaningless while the window is empty.

    >>> state = initial_adaptive_state(AdaptiveConfig(window=8))
    >>> for norm in [1.0, 2.0, 4.0, 100.0, 8.0]:
    ...     state = update_adaptive_state(state, norm, False, AdaptiveConfig(window=8))
    >>> [round(math.exp(float(value)), 3) for value in typical_and_spread(state, AdaptiveConfig(window=8))]
    [4.0, 4.0]
    """
    count, log_norms = state
    count = ops.float32(count)
    ordered = ops.sort(log_norms)
    valid = ops.minimum(count, float(config.window))
    median = ops.pick(ordered, ops.floor((valid - 1.0) / 2.0))
    low = ops.pick(ordered, ops.floor((valid - 1.0) * LOW_QUANTILE))
    return median, median - low


def adaptive_threshold(state, config, ops=TENSOR_OPS):
    """The explosion threshold in norm units.

    `+inf` before the first healthy step; `warmup_ratio` times the typical
    norm until `warmup_steps` healthy steps were seen; then
    `typical * exp(clip(z * spread, log(min_ratio), log(max_ratio)))`. At
    most `burst_ratio` times the typical norm once the window holds
    `burst_count - 1` steps that large (chronic spikes under the bar).

    >>> config = AdaptiveConfig(window=8, warmup_steps=4)
    >>> state = initial_adaptive_state(config)
    >>> float(adaptive_threshold(state, config))
    inf
    >>> state = update_adaptive_state(state, 3.0, False, config)
    >>> round(float(adaptive_threshold(state, config)), 4)  # the second step against the first
    30.0
    >>> for norm in [1.0, 1.0, 1.0]:
    ...     state = update_adaptive_state(state, norm, False, config)
    >>> round(float(adaptive_threshold(state, config)), 4)  # no spread: min_ratio * 1.0
    5.0
    >>> adaptive_threshold(initial_adaptive_state(config, FLOAT_OPS), config, FLOAT_OPS)  # on the host
    inf
    """
    return threshold_and_typical(state, config, ops)[0]


def threshold_and_typical(state, config, ops=TENSOR_OPS):
    """`(adaptive_threshold, log typical norm)`: the threshold and the median
    it comes from, in one pass over the window (see `adaptive_threshold`)."""
    count = ops.float32(state[0])
    median, spread = typical_and_spread(state, config, ops)
    margin = ops.clip(config.z_threshold * spread, _log(config.min_ratio, ops), _log(config.max_ratio, ops))
    threshold = ops.where(count < config.warmup_steps, ops.exp(median) * config.warmup_ratio,
                          ops.exp(median + margin))
    # Chronic trouble: the window already holds `burst_count - 1` loud steps.
    loud = median + _log(config.burst_ratio, ops)
    burst = ops.logical_and(ops.count_at_least(state[1], loud) >= ops.float32(config.burst_count) - 1.0,
                            ops.float32(config.burst_count) > 0.0)
    threshold = ops.where(burst, ops.minimum(threshold, ops.exp(loud)), threshold)
    return ops.where(count < 1.0, ops.float32(math.inf), threshold), median


def _log(value, ops):
    """`log(value)` of a setting: a Python number (folded at trace time), or a
    vector of them (`benchmarks/false_alarms.py --sweep` replays many settings)."""
    return math.log(value) if isinstance(value, (int, float)) else ops.log(value)


def update_adaptive_state(state, global_norm, exploded, config, ops=TENSOR_OPS):
    """The state after one step: a healthy norm (not `exploded`, finite and
    positive) enters the window, replacing the oldest; otherwise unchanged.

    >>> config = AdaptiveConfig(window=2)
    >>> state = update_adaptive_state(initial_adaptive_state(config), 2.0, False, config)
    >>> float(state.count), [round(math.exp(float(v)), 4) for v in state.log_norms]
    (1.0, [2.0, inf])
    >>> same = update_adaptive_state(state, 1e6, True, config)  # exploded: ignored
    >>> float(same.count)
    1.0
    """
    count, log_norms = state
    count = ops.float32(count)
    norm = ops.float32(global_norm)
    healthy = ops.logical_and(ops.logical_not(ops.as_bool(exploded)),
                              ops.logical_and(ops.is_finite(norm), norm > 0))
    log_norm = ops.log(ops.where(healthy, norm, 1.0))
    window = float(config.window)
    slot = count - window * ops.floor(count / window)
    log_norms = ops.put(log_norms, slot, log_norm, healthy)
    # The count stays exact in float32: past 1024 windows it steps back by
    # 512 windows (the slot sequence and "past warm-up" are unchanged).
    wrap = window * 1024.0
    new_count = ops.where(count + 1.0 >= wrap, count + 1.0 - window * 512.0, count + 1.0)
    return AdaptiveState(ops.where(healthy, new_count, count), log_norms)


def last_norm(state, config, ops=TENSOR_OPS):
    """The norm of the latest healthy step (the last one the window took in);
    0 before any.

    >>> config = AdaptiveConfig(window=2)
    >>> state = initial_adaptive_state(config)
    >>> float(last_norm(state, config))
    0.0
    >>> for norm, exploded in [(3.0, False), (5.0, False), (7.0, False), (1e6, True)]:
    ...     state = update_adaptive_state(state, norm, exploded, config)
    >>> round(float(last_norm(state, config)), 4)  # the window wrapped; the explosion never entered
    7.0
    """
    count = ops.float32(state[0])
    window = float(config.window)
    latest = ops.maximum(count - 1.0, 0.0)
    slot = latest - window * ops.floor(latest / window)
    return ops.where(count < 1.0, 0.0, ops.exp(ops.pick(state[1], slot)))


def start_rejudged(state, log_typical, steps, ratio, config, ops=TENSOR_OPS):
    """Whether one of the first `steps` healthy steps was an explosion after
    all: judged again, at the one step whose `state` (before its update)
    first holds `config.window` healthy steps, a norm at least `ratio` times
    the typical norm of that full window (`log_typical`, its log, from
    `threshold_and_typical`).

    During the warm-up a step is only compared with the few before it, so a
    run whose very first steps were all far too large (a corrupted batch at
    step 1, inputs that blow up an untrained net) took them as healthy. Once
    the window is full its median no longer depends on them. `ratio` is
    well above the detector's own factor (`max_ratio`): a healthy run's
    first steps are often several times its later norms, as the loss falls
    (up to 10x on this project's healthy runs).

    >>> config = AdaptiveConfig(window=4, warmup_steps=4)
    >>> state = initial_adaptive_state(config)
    >>> for norm in [50.0, 1.0, 1.2, 0.9]:  # steps 1-4: the first was 50x the others
    ...     state = update_adaptive_state(state, norm, False, config)
    >>> typical = threshold_and_typical(state, config)[1]  # log(1.0): the lower median
    >>> [bool(start_rejudged(state, typical, 2, ratio, config)) for ratio in [20.0, 60.0]]
    [True, False]
    >>> state = update_adaptive_state(state, 1.1, False, config)  # one step later: never again
    >>> bool(start_rejudged(state, threshold_and_typical(state, config)[1], 2, 20.0, config))
    False
    """
    full_now = ops.equal(ops.float32(state[0]), float(config.window))
    first = ops.largest(state[1], max(1, min(int(steps), config.window)))
    return ops.logical_and(full_now, first >= log_typical + math.log(ratio))


def is_explosion(global_norm, threshold, ops=TENSOR_OPS):
    """`not (global_norm < threshold)`: NaN and Inf always explode, and so does equality.

    Spelled `norm >= threshold or isnan(norm) or isnan(threshold)`: in graph
    mode Grappler rewrites `logical_not(a < b)` into `a >= b`, False for NaN.

    >>> [bool(is_explosion(norm, 10.0)) for norm in [9.9, 10.0, float("nan"), float("inf")]]
    [False, True, True, True]
    """
    norm, threshold = ops.float32(global_norm), ops.float32(threshold)
    return ops.logical_or(norm >= threshold, ops.logical_or(ops.is_nan(norm), ops.is_nan(threshold)))


class FloatDetector:
    """The adaptive detector on the host, one step at a time: the maths of
    `adaptive_threshold`, `is_explosion` and `update_adaptive_state` with
    `FLOAT_OPS`, operation for operation (so the same floats), written out
    without the `ops` indirection, and the threshold recomputed only when the
    window changes (a healthy step): less than half the time of the
    generic code (issue 22: 2.95 against 6.9 us a row on a loaded machine). Tests compare it with the `FLOAT_OPS` functions on every step.

    >>> detector = FloatDetector(AdaptiveConfig(window=8, warmup_steps=4))
    >>> detector.threshold
    inf
    >>> detector.step(3.0)  # (exploded, the threshold it was judged by)
    (False, inf)
    >>> round(detector.threshold, 6)  # the next step's: 10 x the first norm (warm-up)
    30.0
    """

    def __init__(self, config=None):
        self.config = config or AdaptiveConfig()
        window = self.config.window
        self.count = 0.0
        self.log_norms = [math.inf] * window
        self._window = float(window)
        self._wrap = float(window) * 1024.0
        self._back = float(window) * 512.0
        self._log_min = math.log(self.config.min_ratio)
        self._log_max = math.log(self.config.max_ratio)
        self._log_burst = math.log(self.config.burst_ratio)
        self.threshold = self._compute()

    @property
    def state(self):
        """The `AdaptiveState` (float count, tuple window) of `FLOAT_OPS`."""
        return AdaptiveState(self.count, tuple(self.log_norms))

    def _compute(self):
        config, count = self.config, self.count
        if count < 1.0:
            return math.inf
        ordered = sorted(self.log_norms)
        valid = count if count <= self._window else self._window
        size = len(ordered)
        index = math.floor((valid - 1.0) / 2.0)
        median = ordered[int(index)] if 0 <= index < size else 0.0
        index = math.floor((valid - 1.0) * LOW_QUANTILE)
        low = ordered[int(index)] if 0 <= index < size else 0.0
        if count < config.warmup_steps:
            threshold = _exp(median) * config.warmup_ratio
        else:
            margin = min(max(config.z_threshold * (median - low), self._log_min), self._log_max)
            threshold = _exp(median + margin)
        loud = median + self._log_burst
        loud_steps = bisect.bisect_left(ordered, math.inf) - bisect.bisect_left(ordered, loud)
        if config.burst_count > 0 and loud_steps >= config.burst_count - 1.0:
            threshold = min(threshold, _exp(loud))
        return threshold

    def step(self, norm):
        """Judges a step's global norm and updates the window: `(exploded, threshold)`."""
        norm = float(norm)
        threshold = self.threshold
        exploded = norm >= threshold or (math.isnan(norm) or math.isnan(threshold))
        if not exploded and math.isfinite(norm) and norm > 0:
            count = self.count
            slot = count - self._window * math.floor(count / self._window)
            self.log_norms[int(slot)] = float(math.log(norm))
            count += 1.0
            self.count = count - self._back if count >= self._wrap else count
            self.threshold = self._compute()
        return exploded, threshold

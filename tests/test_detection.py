import dataclasses
import doctest
import math
import types

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch import detection
from gradwatch.detection import (AdaptiveConfig, adaptive_threshold, initial_adaptive_state, is_explosion,
                                 update_adaptive_state)

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)

DEFAULTS = AdaptiveConfig()


class NumpyDetector:
    """Independent float64 reimplementation: numpy sort of the last `window` healthy log-norms."""

    def __init__(self, config):
        self.config = config
        self.logs = []  # every healthy log-norm, oldest first

    def threshold(self):
        c = self.config
        if not self.logs:
            return math.inf
        window = np.sort(self.logs[-c.window:])
        n = len(window)
        median, low = window[(n - 1) // 2], window[int(math.floor((n - 1) * 0.16))]
        if len(self.logs) < c.warmup_steps:
            threshold = math.exp(median) * c.warmup_ratio
        else:
            margin = min(max(c.z_threshold * (median - low), math.log(c.min_ratio)), math.log(c.max_ratio))
            threshold = math.exp(median + margin)
        loud = int(np.sum(window >= median + math.log(c.burst_ratio)))
        if c.burst_count > 0 and loud >= c.burst_count - 1:  # chronic spikes: the bar drops to burst_ratio
            threshold = min(threshold, math.exp(median + math.log(c.burst_ratio)))
        return threshold

    def step(self, norm):
        exploded = not norm < self.threshold()
        if not exploded and 0 < norm < math.inf:
            self.logs.append(math.log(norm))
        return exploded


def run_eagerly(norms, config):
    state, thresholds, alarms = initial_adaptive_state(config), [], []
    for norm in norms:
        threshold = adaptive_threshold(state, config)
        exploded = is_explosion(norm, threshold)
        state = update_adaptive_state(state, norm, exploded, config)
        thresholds.append(float(threshold))
        alarms.append(bool(exploded))
    return np.array(thresholds), np.array(alarms), state


def compiled_replay(config, jit_compile):
    """A tf.function running the detector over a 1-D sequence with tf.while_loop."""

    @tf.function(jit_compile=jit_compile, input_signature=[tf.TensorSpec([None], tf.float32)])
    def replay(norms):
        def body(step, state, thresholds, alarms):
            threshold = adaptive_threshold(state, config)
            exploded = is_explosion(norms[step], threshold)
            state = update_adaptive_state(state, norms[step], exploded, config)
            return step + 1, state, thresholds.write(step, threshold), alarms.write(step, exploded)

        size = tf.shape(norms)[0]
        loop_vars = (0, initial_adaptive_state(config), tf.TensorArray(tf.float32, size), tf.TensorArray(tf.bool, size))
        _, state, thresholds, alarms = tf.while_loop(lambda step, *_: step < size, body, loop_vars)
        return thresholds.stack(), alarms.stack(), state

    def run(norms):
        thresholds, alarms, state = replay(tf.constant(norms, tf.float32))
        return thresholds.numpy(), alarms.numpy(), state

    return run


REPLAY = compiled_replay(DEFAULTS, jit_compile=False)  # one trace for all lengths (hypothesis)


def healthy_sequence(seed, length, noise, halving_steps, start):
    """Log-normal noise (clipped at 3 sigma) around a level falling/rising exponentially."""
    rng = np.random.default_rng(seed)
    level = np.log(start) - np.log(2) * np.arange(length) / halving_steps
    return np.exp(level + noise * np.clip(rng.normal(size=length), -3, 3)).astype(np.float32)


# --- is_explosion: absolute threshold semantics --------------------------------------------------


@pytest.mark.parametrize("norm, threshold, expected", [
    (1.0, 2.0, False), (2.0, 2.0, True), (3.0, 2.0, True), (0.0, 2.0, False),
    (math.nan, 2.0, True), (math.inf, 2.0, True), (math.nan, math.inf, True), (math.inf, math.inf, True),
    (3e38, math.inf, False), (1.0, math.nan, True),
])
def test_is_explosion_is_not_less_than(norm, threshold, expected):
    assert bool(is_explosion(norm, threshold)) is expected
    assert bool(is_explosion(np.float64(norm), np.float32(threshold))) is expected
    assert bool(is_explosion(tf.constant(norm), tf.constant(threshold))) is expected
    for jit_compile in (False, True):  # graph mode: Grappler must not turn it into `norm >= threshold`
        compiled = tf.function(is_explosion, jit_compile=jit_compile)
        assert bool(compiled(tf.constant(norm), tf.constant(threshold))) is expected
        assert bool(tf.function(lambda n: is_explosion(n, threshold), jit_compile=jit_compile)(
            tf.constant(norm))) is expected


def test_is_explosion_elementwise_and_overflowing_float64():
    result = is_explosion(np.array([1.0, 5.0, np.nan, 1e300]), 5.0)
    assert result.dtype == tf.bool
    np.testing.assert_array_equal(result, [False, True, True, True])


# --- adaptive detector vs. the numpy reference ---------------------------------------------------

OTHER_CONFIGS = [AdaptiveConfig(window=8, warmup_steps=10, warmup_ratio=3.0, z_threshold=1.5, min_ratio=1.5, max_ratio=50.0),
                 AdaptiveConfig(window=1, warmup_steps=0, warmup_ratio=1.0, z_threshold=1.0, min_ratio=1.0, max_ratio=1.0),
                 AdaptiveConfig(window=16, warmup_steps=4, z_threshold=4.0, max_ratio=30.0, burst_ratio=1.5,
                                burst_count=4),
                 AdaptiveConfig(burst_count=0)]


@pytest.mark.parametrize("config", [DEFAULTS] + OTHER_CONFIGS)
def test_matches_numpy_reference(config):
    norms = healthy_sequence(0, 150, 0.4, -300, 2.0)
    norms[[70, 90, 91]] *= 1000.0  # explosions, kept out of the statistics
    norms[[80, 100, 110, 120]] = [np.nan, np.inf, 0.0, 1e-30]
    reference = NumpyDetector(config)
    expected_thresholds, expected_alarms = [], []
    for norm in norms:
        expected_thresholds.append(reference.threshold())
        expected_alarms.append(reference.step(float(norm)))
    thresholds, alarms, _ = REPLAY(norms) if config is DEFAULTS else compiled_replay(config, False)(norms)
    np.testing.assert_allclose(thresholds, expected_thresholds, rtol=2e-5)
    np.testing.assert_array_equal(alarms, expected_alarms)
    if config is DEFAULTS:
        assert alarms[[70, 80, 90, 91, 100]].all() and alarms.sum() == 5
        eager_thresholds, eager_alarms, _ = run_eagerly(norms[:80], config)
        np.testing.assert_allclose(eager_thresholds, thresholds[:80], rtol=1e-6)


def run_on_host(norms, config):
    """The detector on Python floats (`FLOAT_OPS`), as the host runs it."""
    ops, thresholds, alarms = detection.FLOAT_OPS, [], []
    state = initial_adaptive_state(config, detection.FLOAT_OPS)
    for norm in norms:
        threshold = adaptive_threshold(state, config, ops)
        exploded = is_explosion(float(norm), threshold, ops)
        state = update_adaptive_state(state, float(norm), exploded, config, ops)
        thresholds.append(threshold)
        alarms.append(exploded)
    return np.array(thresholds), np.array(alarms), state


@pytest.mark.parametrize("config", [DEFAULTS] + OTHER_CONFIGS)
def test_host_float_maths_matches_the_in_graph_maths_and_the_reference(config):
    norms = healthy_sequence(3, 200, 0.4, 100, 0.01)
    norms[[60, 61, 120]] *= 1000.0
    norms[[80, 100, 110, 130]] = [np.nan, np.inf, 0.0, 1e-30]
    thresholds, alarms, state = run_on_host(norms, config)
    graph_thresholds, graph_alarms, graph_state = compiled_replay(config, False)(norms)
    reference = NumpyDetector(config)
    reference_alarms = [reference.step(float(norm)) for norm in norms]
    np.testing.assert_array_equal(alarms, graph_alarms)
    np.testing.assert_array_equal(alarms, reference_alarms)
    np.testing.assert_allclose(thresholds, graph_thresholds, rtol=2e-5)
    assert state.count == float(graph_state.count) == len(reference.logs)
    np.testing.assert_allclose(state.log_norms, graph_state.log_norms.numpy(), rtol=2e-5, atol=1e-6)
    assert type(state.count) is float and all(type(v) is float for v in state.log_norms)
    assert type(alarms[0]) is np.bool_


def test_host_maths_survives_huge_norms():
    state = detection.AdaptiveState(60.0, (709.0,) * DEFAULTS.window)  # typical e^709: overflows float64
    assert adaptive_threshold(state, DEFAULTS, detection.FLOAT_OPS) == math.inf
    assert is_explosion(math.inf, math.inf, detection.FLOAT_OPS) is True


def test_window_holds_the_last_healthy_log_norms_in_ring_order():
    config = AdaptiveConfig(window=3)
    _, _, state = run_eagerly([1.0, 2.0, 4.0, 0.5, 3.0], config)
    assert float(state.count) == 5
    # slots 0, 1, 2 got steps 1, 2, 3; then step 4 went to slot 0 and step 5 to slot 1
    np.testing.assert_allclose(state.log_norms.numpy(), np.log([0.5, 3.0, 4.0]), rtol=1e-6)


def test_the_second_step_is_judged_against_the_first_then_warmup_then_the_spread():
    config = AdaptiveConfig(window=8, warmup_steps=5)
    state = initial_adaptive_state(config)
    assert float(adaptive_threshold(state, config)) == math.inf  # the first step: nothing to compare
    state = update_adaptive_state(state, 1e30, False, config)  # huge but finite: no alarm
    for _ in range(4):
        assert float(adaptive_threshold(state, config)) == pytest.approx(config.warmup_ratio * 1e30, rel=1e-5)
        state = update_adaptive_state(state, 1e30, False, config)
    assert float(adaptive_threshold(state, config)) == pytest.approx(config.min_ratio * 1e30, rel=1e-5)


def test_a_corrupted_first_step_does_not_poison_the_baseline():
    """Step 1 50x the clean norm: from step 3 on, the threshold is that of the clean steps."""
    norms = healthy_sequence(5, 80, 0.1, 1e9, 1.0)
    norms[0] *= 50.0
    norms[2] *= 10.0  # a 10x spike at step 3, right after: caught
    norms[40] *= 10.0  # and later
    thresholds, alarms, _ = run_eagerly(norms, DEFAULTS)
    reference = NumpyDetector(DEFAULTS)
    assert [reference.step(float(n)) for n in norms] == alarms.tolist()
    assert np.flatnonzero(alarms).tolist() == [2, 40]
    # the warm-up threshold at step 3 is warmup_ratio x the lower median of steps 1 and 2 (= step 2)
    assert thresholds[2] == pytest.approx(DEFAULTS.warmup_ratio * norms[1], rel=1e-5)


def test_frequent_10x_spikes_stay_10x_spikes():
    """Every fourth step 12x the clean level (a quarter of the batches): each one alarms, the
    threshold stays within the clean level's min/max ratios (an EMA that took them in rose)."""
    norms = healthy_sequence(6, 400, 0.15, 1e9, 2.0)
    spikes = np.arange(3, 400, 4)
    norms[spikes] *= 12.0
    thresholds, alarms, _ = run_eagerly(norms, DEFAULTS)
    flagged = set(np.flatnonzero(alarms).tolist())
    assert flagged <= set(spikes.tolist())  # no clean step
    assert {s for s in spikes.tolist() if s >= DEFAULTS.warmup_steps} <= flagged  # every spike past warm-up
    assert len(flagged) >= len(spikes) - 4  # in warm-up (threshold 10x the median) most of them too
    clean = np.median(np.delete(norms, spikes))
    later = thresholds[DEFAULTS.warmup_steps:]
    assert (later <= DEFAULTS.max_ratio * clean * 1.5).all() and (later >= DEFAULTS.min_ratio * clean / 1.5).all()


def test_frequent_8x_spikes_alarm_from_the_third_in_a_window():
    """Chronic trouble below the 10x bar: 8.5x spikes every 10th step, in a run whose spread puts
    the bar at 10x its median. The first two pass; from the third in one window each one alarms;
    two in a window, then one alone, never alarm."""
    clean = np.tile(np.float32([1.0, 1.5, 2.0, 2.5, 3.0]), 40)  # median 2, 16th percentile 1
    norms = clean.copy()
    spikes = np.arange(45, 200, 10)
    norms[spikes] = 8.5 * 2.0
    thresholds, alarms, _ = run_eagerly(norms, DEFAULTS)
    assert thresholds[44] == pytest.approx(DEFAULTS.max_ratio * 2.0, rel=1e-5)  # 8.5x is below the bar
    flagged = np.flatnonzero(alarms).tolist()
    assert flagged[0] == 65 and set(flagged) <= set(spikes.tolist())  # the third spike, then only spikes
    assert thresholds[65] == pytest.approx(DEFAULTS.burst_ratio * 2.0, rel=1e-5)  # two loud steps in the window
    # Flagged steps never enter the window: the spikes let through refill it, and every third
    # loud step within 32 healthy steps alarms (here 2 of every 4 spikes).
    assert flagged == [s for s in spikes.tolist() if (s - 45) % 40 in (20, 30)]
    once = clean.copy()
    once[[45, 55, 120]] = 8.5 * 2.0
    assert not run_eagerly(once, DEFAULTS)[1].any()
    assert not run_eagerly(norms, AdaptiveConfig(burst_count=0))[1].any()  # turned off: never


def test_geometric_growth_from_the_first_step_is_caught_within_five_steps():
    norms = 3.0 ** np.arange(30)  # x3 a step from the start, no healthy step at all
    reference = NumpyDetector(DEFAULTS)
    flagged = [step for step, norm in enumerate(norms) if reference.step(norm)]
    _, alarms, _ = run_eagerly(norms, DEFAULTS)
    assert list(np.flatnonzero(alarms)) == flagged
    assert flagged[0] == 4  # 81 vs 10 x the lower median (3) of 1, 3, 9, 27
    assert flagged == list(range(4, 30))  # and never taken in: every later step alarms too


def test_a_run_doubling_every_step_is_caught_during_warmup():
    norms = 0.5 * 2.0 ** np.arange(30)
    _, alarms, _ = run_eagerly(norms, DEFAULTS)
    assert 0 < np.flatnonzero(alarms)[0] < 10


def test_one_tiny_norm_cannot_drag_the_threshold_down():
    _, _, state = run_eagerly(np.ones(60), DEFAULTS)
    after = update_adaptive_state(state, 1e-30, False, DEFAULTS)
    assert float(after.count) == 61
    assert float(adaptive_threshold(after, DEFAULTS)) == pytest.approx(float(adaptive_threshold(state, DEFAULTS)))


def test_threshold_is_clipped_between_min_and_max_ratio_of_the_typical_norm():
    quiet = detection.AdaptiveState(50.0, tf.fill([DEFAULTS.window], math.log(3.0)))
    spread = np.log(3.0) + np.linspace(-5.0, 5.0, DEFAULTS.window)
    noisy = detection.AdaptiveState(50.0, tf.constant(spread, tf.float32))
    assert float(adaptive_threshold(quiet, DEFAULTS)) == pytest.approx(3.0 * DEFAULTS.min_ratio, rel=1e-5)
    median = np.sort(spread)[(DEFAULTS.window - 1) // 2]
    no_burst = dataclasses.replace(DEFAULTS, burst_count=0)
    assert float(adaptive_threshold(noisy, no_burst)) == pytest.approx(math.exp(median) * DEFAULTS.max_ratio, rel=1e-5)
    # That window holds many steps above 7x its median: the bar drops to burst_ratio x the median.
    assert float(adaptive_threshold(noisy, DEFAULTS)) == pytest.approx(math.exp(median) * DEFAULTS.burst_ratio, rel=1e-5)


@pytest.mark.parametrize("norm, exploded", [
    (5.0, True), (5.0, np.bool_(True)), (5.0, tf.constant(True)),
    (math.nan, False), (math.inf, False), (-math.inf, False), (0.0, False), (-1.0, False),
])
def test_exploded_and_unusable_norms_do_not_move_the_state(norm, exploded):
    window = tf.constant(np.linspace(0.0, 1.0, DEFAULTS.window), tf.float32)
    state = detection.AdaptiveState(tf.constant(60.0), window)
    new_state = update_adaptive_state(state, norm, exploded, DEFAULTS)
    assert float(new_state.count) == 60.0
    np.testing.assert_array_equal(new_state.log_norms.numpy(), window.numpy())
    assert new_state.count.dtype == tf.float32 and new_state.log_norms.shape == [DEFAULTS.window]


def test_accepts_python_and_numpy_numbers():
    empty = (0, np.full(DEFAULTS.window, np.inf))
    state = update_adaptive_state(empty, np.float64(2.0), np.bool_(False), DEFAULTS)
    assert float(state.count) == 1.0 and float(state.log_norms[0]) == pytest.approx(math.log(2.0))
    assert adaptive_threshold((np.int64(60), np.zeros(DEFAULTS.window)), DEFAULTS).dtype == tf.float32


def test_count_stays_exact_over_very_long_runs():
    config = AdaptiveConfig(window=2, warmup_steps=0)
    state = detection.AdaptiveState(2.0 * 1024 - 1.0, (0.0, 0.0))
    state = update_adaptive_state(state, 1.0, False, config, detection.FLOAT_OPS)
    assert state.count == 2.0 * 512 and state.count % 2 == 0  # stepped back a multiple of the window


# --- compiled use ---------------------------------------------------------------------------------


def test_xla_while_loop_matches_eager_python_loop():
    norms = healthy_sequence(1, 120, 0.3, 60, 5.0)
    norms[[60, 95]] *= 100.0
    thresholds, alarms, _ = compiled_replay(DEFAULTS, jit_compile=True)(norms)
    eager_thresholds, eager_alarms, _ = run_eagerly(norms, DEFAULTS)
    np.testing.assert_allclose(thresholds, eager_thresholds, rtol=1e-5)
    np.testing.assert_array_equal(alarms, eager_alarms)
    assert np.flatnonzero(alarms).tolist() == [60, 95]


def test_xla_train_step_with_variables_traces_once():
    variables = [tf.Variable(v) for v in initial_adaptive_state()]  # count, window
    traces = []

    @tf.function(jit_compile=True)
    def step(norm):
        traces.append(1)
        state = detection.AdaptiveState(*variables)
        threshold = adaptive_threshold(state, DEFAULTS)
        exploded = is_explosion(norm, threshold)
        for variable, value in zip(variables, update_adaptive_state(state, norm, exploded, DEFAULTS)):
            variable.assign(value)
        return exploded

    norms = healthy_sequence(2, 80, 0.2, 100, 1.0)
    norms[70] = np.nan
    norms[75] *= 100
    alarms = [bool(step(tf.constant(n))) for n in norms]
    assert len(traces) == 1
    assert np.flatnonzero(alarms).tolist() == [70, 75]
    assert float(variables[0].numpy()) == 78  # healthy steps: 80 minus the NaN and the spike


def test_vector_states_work_elementwise():
    norms = np.stack([healthy_sequence(s, 70, 0.3, 40, 1.0) for s in range(3)], axis=1)
    state = detection.AdaptiveState(tf.zeros([3]), tf.fill([DEFAULTS.window, 3], math.inf))
    for row in norms:
        state = update_adaptive_state(state, row, is_explosion(row, adaptive_threshold(state, DEFAULTS)), DEFAULTS)
    for column in range(3):
        _, _, single = run_eagerly(norms[:, column], DEFAULTS)
        assert float(state.count[column]) == float(single.count)
        np.testing.assert_allclose(state.log_norms[:, column].numpy(), single.log_norms.numpy(), rtol=1e-6)


def test_vector_settings_give_each_column_its_own_threshold():
    # `benchmarks/false_alarms.py --sweep` replays many settings at once, one per column.
    configs = [AdaptiveConfig(min_ratio=4.0, max_ratio=8.0, burst_count=0), DEFAULTS,
               AdaptiveConfig(z_threshold=2.0, max_ratio=12.0, burst_ratio=3.0)]
    fields = ("warmup_steps", "warmup_ratio", "z_threshold", "min_ratio", "max_ratio", "burst_ratio", "burst_count")
    vector = types.SimpleNamespace(window=DEFAULTS.window, **{
        name: np.array([getattr(c, name) for c in configs], np.float32) for name in fields})
    norms = healthy_sequence(7, 60, 0.4, 40, 1.0)
    state = detection.AdaptiveState(tf.zeros([3]), tf.fill([DEFAULTS.window, 3], math.inf))
    singles = [initial_adaptive_state(c) for c in configs]
    for norm in norms:
        thresholds = adaptive_threshold(state, vector).numpy()
        for column, config in enumerate(configs):
            expected = float(adaptive_threshold(singles[column], config))
            np.testing.assert_allclose(thresholds[column], expected, rtol=1e-6)
            singles[column] = update_adaptive_state(singles[column], norm, is_explosion(norm, expected), config)
        row = np.full(3, norm, np.float32)
        state = update_adaptive_state(state, row, is_explosion(row, thresholds), vector)
    assert len(set(np.round(thresholds, 4))) == 3  # the settings differ where it matters


# --- properties -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(DEFAULTS.warmup_steps + 1, 400),
       noise=st.floats(0.0, 0.5), halving_steps=st.sampled_from([-200.0, -1000.0, 1e9, 400.0, 100.0, 50.0]),
       start=st.floats(1e-4, 1e4), data=st.data())
def test_isolated_100x_spike_after_warmup_is_caught_and_healthy_steps_are_quiet(
        seed, length, noise, halving_steps, start, data):
    norms = healthy_sequence(seed, length, noise, halving_steps, start)
    spike = data.draw(st.integers(DEFAULTS.warmup_steps, length - 1), label="spike")
    norms[spike] *= 100.0
    _, alarms, _ = REPLAY(norms)
    assert np.flatnonzero(alarms).tolist() == [spike]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=300), st.floats(1e-3, 1e6))
def test_falling_norms_never_alarm(factors, start):
    norms = np.maximum(start * np.cumprod(factors), 1e-20)  # non-increasing, positive
    _, alarms, _ = REPLAY(norms)
    assert not alarms.any()


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(z_threshold=-1), "`z_threshold` must be a positive number. Received: z_threshold=-1"),
    (dict(warmup_steps=-1), "`warmup_steps` must be an integer in [0, 256 * window] (window=32). "
                            "Received: warmup_steps=-1"),
    (dict(warmup_steps=2.5), "Received: warmup_steps=2.5"),
    (dict(warmup_steps=True), "Received: warmup_steps=True"),
    (dict(window=0), "`window` must be an integer in [1, 4096]. Received: window=0"),
    (dict(window=2.0), "Received: window=2.0"),
    (dict(warmup_ratio=math.nan), "`warmup_ratio` must be a number >= 1. Received: warmup_ratio=nan"),
    (dict(min_ratio=0.5), "`min_ratio` must be a number >= 1. Received: min_ratio=0.5"),
    (dict(min_ratio=4.0, max_ratio=3.0), "`max_ratio` must be a number >= min_ratio (4.0). Received: max_ratio=3.0"),
    (dict(max_ratio="10"), "Received: max_ratio='10'"),
])
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as error:
        AdaptiveConfig(**kwargs)
    assert message in str(error.value)


def test_config_is_frozen_and_defaults_catch_100x():
    with pytest.raises(AttributeError):
        DEFAULTS.window = 5
    assert DEFAULTS.max_ratio < 100 and DEFAULTS.warmup_steps > 0


def test_docstring_examples():
    assert doctest.testmod(detection, raise_on_error=False).failed == 0


def test_host_detector_flags_rows_like_the_in_graph_replay():
    from gradwatch import policy, state

    norms = healthy_sequence(4, 120, 0.3, 200, 3.0)
    norms[[70, 100]] = [norms[70] * 500.0, np.nan]
    rows = np.zeros([len(norms) + 1, state.LAYERS_START])
    rows[:-1, state.GLOBAL] = norms
    rows[-1, state.FLAGS] = state.OVERFLOW  # a step the loss-scale optimizer skipped: left alone
    rows[-1, state.GLOBAL] = np.nan
    detector = policy.HostDetector(policy.StepPolicy())
    detector.detect(rows[:50])  # two drains: the statistics carry over
    detector.detect(rows[50:])
    thresholds, alarms, _ = REPLAY(norms)
    np.testing.assert_allclose(rows[:-1, state.THRESHOLD], thresholds, rtol=2e-5)
    flags = rows[:, state.FLAGS]
    assert np.flatnonzero(state.has_flag(flags, state.EXPLODED)).tolist() == [70, 100] == np.flatnonzero(
        alarms).tolist()
    assert np.flatnonzero(state.has_flag(flags, state.NONFINITE)).tolist() == [100]
    assert flags[-1] == state.OVERFLOW and rows[-1, state.THRESHOLD] == 0.0


def test_policy_docstring_examples():
    from gradwatch import policy

    assert doctest.testmod(policy, raise_on_error=False).failed == 0


@pytest.mark.parametrize("window,warmup", [(32, 32), (4, 2), (2, 0), (5, 7)])
def test_float_detector_equals_the_float_ops_maths_step_for_step(window, warmup):
    """`FloatDetector` (the host's fast path, issue 22) gives the very floats of
    `adaptive_threshold` / `is_explosion` / `update_adaptive_state` on `FLOAT_OPS`:
    thresholds, verdicts and the window, at every step, through the count's wrap."""
    config = detection.AdaptiveConfig(window=window, warmup_steps=warmup)
    rng = np.random.default_rng(window)
    norms = np.exp(rng.normal(0.0, 0.7, 6000 if window <= 4 else 3000)).tolist()
    for index in rng.choice(len(norms), 60, replace=False):  # spikes, NaN, Inf, zeros, negatives
        norms[index] = rng.choice([norms[index] * 300.0, math.nan, math.inf, 0.0, -1.0])
    ops = detection.FLOAT_OPS
    state = initial_adaptive_state(config, ops)
    detector = detection.FloatDetector(config)
    wrapped, last_count = False, 0.0
    for norm in norms:
        threshold = adaptive_threshold(state, config, ops)
        exploded = is_explosion(norm, threshold, ops)
        state = update_adaptive_state(state, norm, exploded, config, ops)
        got_exploded, got_threshold = detector.step(norm)
        assert (got_exploded, got_threshold) == (exploded, threshold) or (
            math.isnan(threshold) and math.isnan(got_threshold))
        assert detector.state == state
        wrapped, last_count = wrapped or state.count < last_count, state.count
    assert wrapped or window > 4  # the short windows pass the count's wrap (1024 windows)

"""`clip_threshold="auto"` (issue 13): the rule as pure functions against numpy, the threshold
written every step against the rule replayed on the logged norms, and the clipped update measured
on the weights."""

import contextlib
import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch import clipping
from gradwatch import cli as gradwatch_cli
from gradwatch import logs as gradwatch_logs
from helpers import WeightsBeforeEachStep, read_tags, regression_data, two_cpu_strategy

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)


def reference_percentile(column, q):
    """Nearest rank, written independently: the smallest value with at least q% of values <= it."""
    ordered = sorted(column)
    for value in ordered:
        if sum(v <= value for v in ordered) >= q / 100.0 * len(ordered):
            return value
    return ordered[-1]


def reference_threshold(history_rows, q, pooled):
    """The rule on the rows in the window (oldest first): the percentile of the positive
    entries per column (or of all of them), NaN where there are none."""
    rows = np.array(history_rows, np.float64)
    columns = [rows.ravel()] if pooled else [rows[:, c] for c in range(rows.shape[1])]
    values = [reference_percentile(c[c > 0].tolist(), q) if (c > 0).any() else np.nan for c in columns]
    return np.resize(np.array(values), rows.shape[1])


def ring(rows, window):
    """A `[window, k]` ring buffer after appending `rows` in order."""
    buffer = np.zeros((window, len(rows[0])), np.float32)
    for index, row in enumerate(rows):
        buffer[index % window] = row
    return buffer


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("q", [5.0, 10.0, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("count", [1, 3, 8, 11, 30])  # fewer rows than the window, and wrapped around
def test_window_percentile_matches_numpy(count, q, pooled):
    rng = np.random.default_rng(count)
    rows = np.exp(rng.normal(size=(count, 3))).astype(np.float32)
    rows[rng.random(rows.shape) < 0.3] = 0.0  # no gradient for that variable at that step
    rows[:, 2] = 0.0 if count == 3 else rows[:, 2]  # a column without any
    rows = rows.tolist()
    window = 8
    got = clipping.window_percentile(ring(rows, window), count, q, pooled).numpy()
    expected = reference_threshold(rows[-window:], q, pooled)
    np.testing.assert_allclose(got, expected, rtol=0, equal_nan=True)


def test_window_percentile_of_an_empty_window_is_nan_and_runs_under_xla():
    assert np.isnan(clipping.window_percentile(np.zeros((4, 2), np.float32), 0, 10.0).numpy()).all()
    compiled = tf.function(clipping.window_percentile, jit_compile=True)
    history = ring([[3.0], [1.0], [2.0]], 4)
    assert compiled(history, tf.constant(3, tf.int64), 50.0).numpy().tolist() == [2.0]


def test_auto_statistic_per_mode():
    dense = tf.constant([[3.0, -4.0], [0.0, 1.0]])
    sparse = tf.IndexedSlices(tf.constant([[-7.0], [2.0]]), tf.constant([1, 1]), tf.constant([3, 1]))
    bias = tf.constant([-0.5, 2.0])
    grads = [dense, sparse, bias]
    sq = tf.constant([26.0, 25.0, 4.25])  # the sparse one with its duplicates summed: (-7 + 2)^2
    np.testing.assert_allclose(clipping.auto_statistic("clipnorm", grads, sq).numpy(),
                               np.sqrt([26.0, 25.0, 4.25]), rtol=1e-6)
    np.testing.assert_allclose(clipping.auto_statistic("global_clipnorm", grads, sq).numpy(),
                               [np.sqrt(55.25)], rtol=1e-6)
    # clipvalue: the root-mean-square entry, over 4 + 3 (the sparse one's dense shape) + 2 entries
    np.testing.assert_allclose(clipping.auto_statistic("clipvalue", grads, sq).numpy(), [np.sqrt(55.25 / 9)],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown clipping mode"):
        clipping.auto_statistic("clip_norm", grads, sq)


def test_auto_threshold_settings_are_checked():
    with pytest.raises(ValueError, match="percentile"):
        clipping.AutoThreshold(percentile=0)
    with pytest.raises(ValueError, match="window"):
        clipping.AutoThreshold(window=0)
    for name, value in [("rise", 0.5), ("shrink", 0.0), ("shrink", 1.5), ("min_scale", 0.0), ("recover_steps", 0),
                        ("overshoot_gain", -0.5), ("overshoot_steps", 0), ("overshoot_level", -1.5),
                        ("update_ratio", 0.0), ("update_ratio", 1.0), ("update_gain", -1.0), ("update_gain", "1"),
                        ("restart_steps", -1), ("restart_steps", 2.5), ("restart_steps", True),
                        ("rollback_steps", -1), ("rollback_steps", 8.0), ("rollback_level", 0.0),
                        ("rollback_level", 1.5), ("rollback_level", "0.3"), ("rejudge_ratio", 1.0),
                        ("rejudge_ratio", float("nan")), ("rejudge_ratio", True)]:
        with pytest.raises(ValueError, match=f"`{name}` must be .* Received: {name}={value!r}"):
            clipping.AutoThreshold(**{name: value})
    assert clipping.AutoThreshold(overshoot_gain=0.0, shrink=1.0, min_scale=1.0).overshoot_gain == 0.0  # the bounds
    assert clipping.AutoThreshold(update_gain=0.0, update_ratio=0.999).update_gain == 0.0
    assert clipping.AutoThreshold(restart_steps=0).keeps_weights  # the watch keeps them
    assert clipping.AutoThreshold(restart_steps=0, overshoot_gain=0.0, update_gain=0.0).keeps_weights  # the rollback
    assert not clipping.AutoThreshold(restart_steps=0, rollback_steps=0, overshoot_gain=0.0,
                                      update_gain=0.0).keeps_weights
    assert clipping.AutoThreshold(rollback_level=1.0).rollback_level == 1.0
    assert clipping.AutoThreshold().rejudges_start
    assert not clipping.AutoThreshold(rejudge_ratio=float("inf")).rejudges_start
    assert not clipping.AutoThreshold(restart_steps=0).rejudges_start


# -- in a real fit ------------------------------------------------------------------

SPIKE_STEP, STEPS, BATCH, LR = 8, 20, 16, 0.05


def _data():
    x, y = regression_data(n=STEPS * BATCH)
    y[(SPIKE_STEP - 1) * BATCH:SPIKE_STEP * BATCH] *= 1e4
    return x, y


def _fit(tmp_path, mode, optimizer=None, extra_callbacks=(), data=None, **monitor_args):
    x, y = data or _data()
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, activation="tanh", use_bias=False, name="hidden"),
                              keras.layers.Dense(1, use_bias=False, name="out")])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip=mode, clip_threshold="auto",
                                        explosion_threshold=200.0, verbose=0, update_freq=5, **monitor_args)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[snapshots, *extra_callbacks, monitor])
    weights = snapshots.snapshots + [[v.numpy() for v in model.trainable_variables]]
    deltas = [[b - a for a, b in zip(w0, w1)] for w0, w1 in zip(weights, weights[1:])]
    return model, monitor, read_tags(str(tmp_path)), deltas, _overshoot_factors(model, snapshots.snapshots, x, y)


def _overshoot_factors(model, snapshots, x, y, auto=clipping.AUTO):
    """`{step: factor}` of the overshoot watch from the switch (`SPIKE_STEP`) on, replayed
    independently: each step's gradient from a tape at the weights it saw (`snapshots`), the
    update from the weights before and after (`_replay_overshoot`)."""
    gradients, flat, final = [], [], model.get_weights()
    for k, weights in enumerate(snapshots):
        model.set_weights(weights)
        with tf.GradientTape() as tape:
            rows = slice(k * BATCH, (k + 1) * BATCH)
            loss = tf.reduce_mean(tf.square(model(x[rows]) - y[rows]))
        gradients.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, model.trainable_variables)]))
        flat.append(np.concatenate([w.ravel() for w in weights]))
    model.set_weights(final)
    factors = _replay_overshoot(gradients, flat, SPIKE_STEP - 1, auto)
    return {SPIKE_STEP + i: f for i, f in enumerate(factors)}


def _expected_thresholds(logged, names, q, pooled, window, auto=clipping.AUTO, divide=1.0, factors=None):
    """Per step from the switch on: the rule (`clipping.AutoThreshold`), written again here,
    replayed on the logged pre-clip statistics (one variable per layer here; `divide`: the
    statistic is the logged norm over it). The percentile of the healthy steps' window,
    entries capped at `rise` x the baseline once clipping is on, the threshold capped there
    too, times the scale that shrinks while clipped steps keep growing, times the overshoot
    watch's factor of the step (`factors`, from `_overshoot_factors`)."""
    exploded_steps = logged.get("grad_norm/explosion", {})
    rows, expected = [], {}
    active, base, scale, reference = False, None, 1.0, None
    for step in range(1, STEPS + 1):
        values = np.array([logged[f"grad_norm/{name}"][step] for name in names]) / divide
        norm, exploded = logged["grad_norm/global"][step], step in exploded_steps
        was_active = active
        if not exploded:
            rows.append(np.minimum(values, auto.rise * base) if was_active else values)
        if not active and exploded:
            active = True
            base = reference_threshold(rows[-window:], q, pooled)
            reference = norm
        if not active:
            continue
        value = reference_threshold(rows[-window:], q, pooled) if auto.follow else base
        if was_active and exploded and norm * auto.shrink >= reference:
            scale = max(scale * min(reference / norm, auto.shrink), auto.min_scale)
            reference = norm
        elif np.isfinite(norm):
            scale = min(scale / auto.shrink ** (1.0 / auto.recover_steps), 1.0)
        expected[step] = np.minimum(value, auto.rise * base) * scale * (factors or {}).get(step, 1.0)
    return expected


def test_clipnorm_auto_threshold_written_every_step_is_the_rule_and_bounds_each_update(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    auto = clipping.AUTO
    model, monitor, logged, deltas, factors = _fit(tmp_path, "clipnorm")
    names = ["hidden", "out"]
    expected = _expected_thresholds(logged, names, auto.percentile, not auto.per_variable, auto.window,
                                    factors=factors)
    written = logged["grad_norm/clip_threshold"]
    assert sorted(written) == list(range(SPIKE_STEP, STEPS + 1))  # every step from the switch on, only those
    for step, per_variable in expected.items():
        assert written[step] == pytest.approx(clipping_record(per_variable, auto), rel=1e-5)
        for name, t, delta in zip(names, per_variable, deltas[step - 1]):
            norm = logged[f"grad_norm/{name}"][step]  # the pre-clip norm of that variable
            assert np.linalg.norm(delta) == pytest.approx(LR * min(norm, t), rel=1e-4), (step, name)
    assert len(set(written.values())) > 3  # it follows the run
    assert monitor.clipping_events[0]["step"] == SPIKE_STEP
    assert monitor.clipping_events[0]["threshold"] == pytest.approx(written[SPIKE_STEP])
    assert model.optimizer.clipnorm == pytest.approx(written[STEPS])  # the latest threshold
    switch = [r.getMessage() for r in caplog.records if hasattr(r, "gradwatch_clipping")]
    assert len(switch) == 1 and f"switched on clipnorm={written[SPIKE_STEP]:.4g} (it follows the run: per variable, " \
        f"the 25th percentile of each variable's gradient norm over the last 256 healthy steps, updated every " \
        f"step, never above this first value, lower while clipped norms keep doubling or while each update " \
        f"overshoots or moves the weights by over 0.01 of their norm) at step " \
        f"{SPIKE_STEP}" in switch[0]


def clipping_record(thresholds, auto):
    """What is written for a step: the one threshold, or the largest per-variable one."""
    return float(np.max(thresholds))


@pytest.mark.parametrize("mode", ["global_clipnorm", "clipvalue"])
def test_global_and_value_thresholds_follow_the_run_and_bound_the_update(tmp_path, mode):
    model, monitor, logged, deltas, factors = _fit(tmp_path, mode)
    written = logged["grad_norm/clip_threshold"]
    assert sorted(written) == list(range(SPIKE_STEP, STEPS + 1))
    if mode == "global_clipnorm":
        expected = _expected_thresholds(logged, ["global"], clipping.AUTO.percentile, False, clipping.AUTO.window,
                                        factors=factors)
        for step, (t,) in expected.items():
            assert written[step] == pytest.approx(t, rel=1e-6)
            assert np.sqrt(sum(np.sum(d ** 2) for d in deltas[step - 1])) == pytest.approx(
                LR * min(logged["grad_norm/global"][step], t), rel=1e-4)
    else:  # the root-mean-square entry: the global norm over sqrt(8 * 16 + 16 * 1 entries)
        expected = _expected_thresholds(logged, ["global"], clipping.AUTO.percentile, False, clipping.AUTO.window,
                                        divide=np.sqrt(144.0), factors=factors)
        for step, (t,) in expected.items():
            assert written[step] == pytest.approx(t, rel=1e-5)
        for step in range(SPIKE_STEP, STEPS + 1):
            largest = max(np.abs(d).max() for d in deltas[step - 1])
            assert largest <= LR * written[step] * (1 + 1e-5) + 1e-6  # the deltas: float32 weights of ~1 subtracted
        assert max(np.abs(d).max() for d in deltas[SPIKE_STEP - 1]) == pytest.approx(LR * written[SPIKE_STEP], rel=1e-4)
    assert getattr(model.optimizer, mode) == pytest.approx(written[STEPS], rel=1e-6)  # the latest one


def test_a_healthy_run_is_never_clipped(tmp_path):
    x, y = regression_data(n=STEPS * BATCH)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9), loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", clip_threshold="auto", verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[monitor])
    assert monitor.clipping_events == [] and model.optimizer.clipnorm is None
    assert "grad_norm/clip_threshold" not in read_tags(str(tmp_path))


@pytest.mark.parametrize("reset", [True, False])
def test_reset_momentum_zeroes_the_slots_at_the_switch(tmp_path, reset):
    optimizer = keras.optimizers.SGD(LR, momentum=0.9)
    model, monitor, logged, deltas, _ = _fit(tmp_path, "global_clipnorm", optimizer=optimizer, reset_momentum=reset)
    t = logged["grad_norm/clip_threshold"][SPIKE_STEP]
    update = np.sqrt(sum(np.sum(d ** 2) for d in deltas[SPIKE_STEP - 1]))
    # Keras' SGD: m <- 0.9 m - lr g; w <- w + m. With the slot zeroed first, the step moves by lr * t exactly.
    if reset:
        assert update == pytest.approx(LR * t, rel=1e-4)
    else:
        assert abs(update - LR * t) > 1e-3 * LR * t


class UsesOneBranch(keras.Model):
    def __init__(self):
        super().__init__()
        self.used = keras.layers.Dense(1, name="used")
        self.unused = keras.layers.Dense(1, name="unused")

    def call(self, x):
        return self.used(x)


def test_per_variable_thresholds_when_some_variables_have_no_gradient(tmp_path):
    """Keras drops the missing gradients: the step's gradients map to their variables' columns."""
    x, y = _data()
    model = UsesOneBranch()
    model(x[:1])
    model.unused.build((None, 8))  # trainable, never in the loss
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", clip_threshold="auto",
                                        explosion_threshold=200.0, verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    written = read_tags(str(tmp_path))["grad_norm/clip_threshold"]
    assert monitor.clipping_events[0]["step"] == SPIKE_STEP and sorted(written) == list(range(SPIKE_STEP, STEPS + 1))
    unused_kernel = model.unused.kernel.numpy()
    np.testing.assert_array_equal(snapshots.snapshots[0][2], unused_kernel)
    spike_update = [b - a for a, b in zip(snapshots.snapshots[SPIKE_STEP - 1], snapshots.snapshots[SPIKE_STEP])]
    for delta in spike_update[:2]:  # the used kernel and bias: clipped at their own threshold, at most the max
        assert 0 < np.linalg.norm(delta) <= LR * written[SPIKE_STEP] * (1 + 1e-5)


class GrowingLearningRate(keras.callbacks.Callback):
    """The learning rate times `factor` at every step from `step` on (a run that diverges
    however it is clipped)."""

    def __init__(self, step, factor):
        super().__init__()
        self.step, self.factor, self.seen = step, factor, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.step:
            self.model.optimizer.learning_rate.assign(LR * self.factor ** (self.seen - self.step + 1))


@pytest.mark.parametrize("mode, watch", [("clipnorm", False), ("global_clipnorm", False), ("global_clipnorm", True)])
def test_the_threshold_cannot_climb_with_a_divergence(tmp_path, mode, watch):
    """From step 8 the learning rate grows x4 a step (clean data) and the run diverges; the adaptive
    detector switches clipping on: the threshold written at every step is the rule replayed
    independently (the overshoot watch off), never above its value at the switch, and it comes
    down while the norms keep doubling. With the watch on (the default), each update moving the
    weights by far more than `update_ratio` of their norm takes it lower still."""
    x, y = regression_data(n=STEPS * BATCH)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", use_bias=False, name="hidden"),
                              keras.layers.Dense(1, use_bias=False, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    rule = clipping.AUTO if watch else clipping.AutoThreshold(overshoot_gain=0.0, update_gain=0.0)
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip=mode, clip_threshold=rule,
                                        verbose=0, update_freq=5)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[GrowingLearningRate(SPIKE_STEP, 4.0), monitor])
    logged = read_tags(str(tmp_path))
    names = ["hidden", "out"] if mode == "clipnorm" else ["global"]
    expected = _expected_thresholds(logged, names, clipping.AUTO.percentile, False, clipping.AUTO.window)
    written = logged["grad_norm/clip_threshold"]
    for step, per_column in expected.items():
        if watch:
            assert written[step] <= float(np.max(per_column)) * (1 + 1e-5), step
        else:
            assert written[step] == pytest.approx(float(np.max(per_column)), rel=1e-5), step
    switch = monitor.clipping_events[0]["step"]
    assert SPIKE_STEP < switch < STEPS - 3 and sorted(written) == list(range(switch, STEPS + 1))
    at_switch = written[switch]
    assert all(value <= at_switch * (1 + 1e-6) for value in written.values())
    assert min(written.values()) < (0.1 if watch else 0.5) * at_switch  # it shrank while the norms kept doubling


def _tape_gradient(model, weights, x, y, step):
    """The MSE gradient of batch `step` (from 1, unshuffled) at `weights`, float64: a tape."""
    model.set_weights(weights)
    with tf.GradientTape() as tape:
        rows = slice((step - 1) * BATCH, step * BATCH)
        loss = tf.reduce_mean(tf.square(model(x[rows]) - y[rows]))
    return [g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]


@pytest.mark.parametrize("mode", ["global_clipnorm", "clipvalue"])
@pytest.mark.parametrize("restart_steps", [16, 4, 0])
def test_a_run_in_trouble_within_its_first_steps_restarts_from_its_first_weights(tmp_path, caplog, capsys, mode,
                                                                                  restart_steps):
    """Targets x1e4 at step 8 (7 healthy steps before): with `restart_steps=16` (the default)
    the run restarts: the weights after the switching step are the weights before step 1 minus
    the clipped update of that step's gradient (a tape at the weights the step saw, clipped
    here), and the switch is recorded and logged as a restart; with `restart_steps` 4 or 0 it is
    too late for one (or off): the clipped update starts from the weights the step saw."""
    caplog.set_level(logging.WARNING, logger="gradwatch")
    x, y = _data()
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, activation="tanh", use_bias=False, name="hidden"),
                              keras.layers.Dense(1, use_bias=False, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip=mode, verbose=0, update_freq=5,
                                        clip_threshold=clipping.AutoThreshold(restart_steps=restart_steps))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    [event] = monitor.clipping_events
    assert event["step"] == SPIKE_STEP
    restarted = restart_steps > SPIKE_STEP - 1
    assert event.get("restarted", False) is restarted
    weights = snapshots.snapshots + [[v.numpy() for v in model.trainable_variables]]
    seen = weights[SPIKE_STEP - 1]  # the weights the switching step saw
    grads = _tape_gradient(model, seen, x, y, SPIKE_STEP)
    threshold = read_tags(str(tmp_path))["grad_norm/clip_threshold"][SPIKE_STEP]
    if mode == "global_clipnorm":
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        clipped = [g * min(1.0, threshold / norm) for g in grads]
    else:
        clipped = [np.clip(g, -threshold, threshold) for g in grads]
    start = weights[0] if restarted else seen
    for before, grad, after in zip(start, clipped, weights[SPIKE_STEP]):
        np.testing.assert_allclose(after, before - LR * grad, rtol=1e-5, atol=1e-6)
    assert not np.allclose(weights[0][0], seen[0])  # the 7 steps before did move the weights
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("switched on")]
    assert len(logged) == 1 and ("restarts from the weights it had before its first step" in logged[0]) is restarted
    [run] = gradwatch_logs.read_logdir(str(tmp_path))
    assert [(c.step, c.restarted) for c in run.clipping] == [(SPIKE_STEP, restarted)]
    capsys.readouterr()
    assert gradwatch_cli.main(["report", str(tmp_path), "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)["runs"]
    assert [(c["step"], c["restarted"]) for c in report["clipping"]] == [(SPIKE_STEP, restarted)]
    gradwatch_cli.main(["report", str(tmp_path)])
    assert ("restarted from the weights before the first step" in capsys.readouterr().out) is restarted


REJUDGE_STEPS = 40  # the detector's window (32) is first full at step 33


@pytest.mark.parametrize("mode, factor, rollback_steps", [("global_clipnorm", 30.0, 32), ("clipvalue", 30.0, 32),
                                                           ("global_clipnorm", 1.0, 32), ("global_clipnorm", 30.0, 8)])
def test_first_steps_judged_again_once_the_window_is_full(tmp_path, caplog, capsys, mode, factor, rollback_steps):
    """The first batch's targets x30: steps 1-3 are far larger than the rest, but the warm-up
    only compares each with the ones before it and takes them as healthy. At step 33, the
    first whose detector state holds a full window (32 healthy steps), the first 16 are judged
    again: one at least 20x the window's (lower) median, computed here from the logged norms,
    switches clipping on at that step and restarts the run from its first weights: the weights
    after step 33 are the weights before step 1 minus the clipped update of step 33's gradient
    (a tape at the weights it saw). No step is recorded as an explosion; the alert names the
    step. Without the corruption (x1: the first steps are ~10x the later ones, as a healthy
    regression's are while its loss falls) nothing switches and the weights equal plain SGD's.
    With `rollback_steps=8` the kept weights were refreshed at a quiet step before step 33: the
    run goes back to those, and the alert says so."""
    caplog.set_level(logging.WARNING, logger="gradwatch")
    x, y = regression_data(n=REJUDGE_STEPS * BATCH)
    y[:BATCH] *= factor

    def model():
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", use_bias=False),
                                keras.layers.Dense(1, use_bias=False)])
        net.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        return net

    net, snapshots = model(), WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip=mode, update_freq=5, verbose=0,
                                        clip_threshold=clipping.AutoThreshold(rollback_steps=rollback_steps))
    net.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    logged = read_tags(str(tmp_path))
    norms = [logged["grad_norm/global"][s] for s in range(1, 33)]
    typical = np.sort(norms)[15]  # the lower median of the window
    first = int(np.argmax(norms[:16])) + 1
    expected = bool(norms[first - 1] >= 20.0 * typical)
    assert expected is (factor > 1)  # the case is what it says: 40x vs 10x here
    assert monitor.explosions == []
    if not expected:
        assert monitor.clipping_events == []
        plain = model()
        plain.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        for a, b in zip(plain.get_weights(), net.get_weights()):
            np.testing.assert_array_equal(a, b)
        return
    [event] = monitor.clipping_events
    assert (event["step"], event["restarted"], event["rejudged"], event["cause_step"]) == (33, True, True, first)
    weights = snapshots.snapshots + [[v.numpy() for v in net.trainable_variables]]
    grads = _tape_gradient(net, weights[32], x, y, 33)
    threshold = logged["grad_norm/clip_threshold"][33]
    if mode == "global_clipnorm":
        norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        clipped = [g * min(1.0, threshold / norm) for g in grads]
    else:
        clipped = [np.clip(g, -threshold, threshold) for g in grads]
    kept = event["restart_step"]
    assert (kept == 1) is (rollback_steps == 32) and kept < 33
    for before, grad, after in zip(weights[kept - 1], clipped, weights[33]):
        np.testing.assert_allclose(after, before - LR * grad, rtol=1e-5, atol=1e-6)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("switched on")]
    assert "at step 33 (that step included), after the run's first steps were judged again" in line
    assert f"step {first} (global norm {norms[first - 1]:.3g}) was at least 20x their typical norm" in line
    assert line.endswith("; the run restarts from the weights it had before its first step, clipped" if kept == 1
                         else f"; the run goes back to the weights it had before step {kept} (the last kept), clipped")
    capsys.readouterr()
    assert gradwatch_cli.main(["report", str(tmp_path), "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)["runs"]
    assert [(c["step"], c["cause_step"], c["restarted"]) for c in report["clipping"]] == [(33, first, True)]


ROLLBACK_STEPS, TROUBLE_STEP, LONG_STEPS = 8, 22, 40


@pytest.mark.parametrize("trouble, where", [("building_up", "one device"), ("building_up", "mirrored"),
                                            ("building_up", "xla"), ("out_of_the_blue", "one device")])
def test_a_switch_after_a_build_up_rolls_back_to_the_weights_kept_at_a_quiet_step(tmp_path, caplog, capsys, trouble,
                                                                                    where):
    """`rollback_steps=8`, `restart_steps=4`. From step 22 either the learning rate grows x3 a step
    (the norms build up over a few steps before one crosses the threshold) or one batch's targets
    are x1e4 (out of the blue, after quiet steps). Building up: the last healthy step before the
    switch was loud (>= `rollback_level` x the threshold, from the logged norms), and the weights
    after the switching step are those before the last step kept (the first; then the first quiet
    step 8 or more steps after the last kept, replayed from the logged norms and thresholds),
    minus the learning rate x the switching step's gradient (a tape at the weights it saw)
    clipped; recorded with
    that step, logged, in the report and its JSON. Out of the blue: no rollback; the clipped update
    starts from the weights the switching step saw. On one device, under MirroredStrategy (two
    replicas: the tape's full-batch gradient is their all-reduced one) and under XLA."""
    caplog.set_level(logging.WARNING, logger="gradwatch")
    x, y = regression_data(n=LONG_STEPS * BATCH)
    callbacks = []
    if trouble == "building_up":
        callbacks.append(GrowingLearningRate(TROUBLE_STEP, 2.0))
    else:
        y[(TROUBLE_STEP - 1) * BATCH:TROUBLE_STEP * BATCH] *= 1e4
    strategy = two_cpu_strategy() if where == "mirrored" else None
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = keras.Sequential([keras.Input((8,)),
                                  keras.layers.Dense(16, activation="tanh", use_bias=False, name="hidden"),
                                  keras.layers.Dense(1, use_bias=False, name="out")])
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", jit_compile=where == "xla")
    rates, snapshots = LearningRates(), WeightsBeforeEachStep()
    rule = clipping.AutoThreshold(restart_steps=4, rollback_steps=ROLLBACK_STEPS)
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="global_clipnorm", verbose=0, update_freq=5,
                                        clip_threshold=rule)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=callbacks + [rates, snapshots, monitor])
    [event] = monitor.clipping_events
    switch = event["step"]
    logged = read_tags(str(tmp_path))
    norms, thresholds = logged["grad_norm/global"], logged["grad_norm/threshold"]
    assert TROUBLE_STEP <= switch < LONG_STEPS and norms[switch] >= thresholds[switch]
    assert all(norms[s] < thresholds[s] for s in range(2, switch))  # every step before was healthy
    loud = norms[switch - 1] >= rule.rollback_level * thresholds[switch]
    assert loud is (trouble == "building_up")
    kept = [1]  # the first step's weights, then the first quiet step 8 or more steps after the last kept
    for s in range(2, switch):
        due = s >= rule.restart_steps and s - kept[-1] >= ROLLBACK_STEPS
        if due and norms[s] < rule.rollback_level * thresholds[s]:
            kept.append(s)
    assert len(kept) > 2
    rolled_back = kept[-1] if loud else None
    assert event.get("restarted", False) is loud and event.get("restart_step") == rolled_back
    weights = snapshots.snapshots + [[v.numpy() for v in model.trainable_variables]]
    seen = weights[switch - 1]  # the weights the switching step saw
    grads = _tape_gradient(model, seen, x, y, switch)
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
    clipped = [g * min(1.0, logged["grad_norm/clip_threshold"][switch] / norm) for g in grads]
    start = weights[rolled_back - 1] if loud else seen
    for before, grad, after in zip(start, clipped, weights[switch]):
        np.testing.assert_allclose(after, before - rates.rates[switch - 1] * grad, rtol=1e-4, atol=1e-6)
    if loud:
        assert not np.allclose(start[0], seen[0])  # the steps since did move the weights
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("switched on")]
    assert (f"rolls back to the weights it had before step {rolled_back}" in line) is loud
    [run] = gradwatch_logs.read_logdir(str(tmp_path))
    assert [(c.step, c.restarted, c.restart_step) for c in run.clipping] == [(switch, loud, rolled_back)]
    capsys.readouterr()
    assert gradwatch_cli.main(["report", str(tmp_path), "--json"]) == 0
    [report] = json.loads(capsys.readouterr().out)["runs"]
    assert [(c["step"], c["restarted"], c["restart_step"]) for c in report["clipping"]] == [(switch, loud, rolled_back)]
    gradwatch_cli.main(["report", str(tmp_path)])
    assert (f"rolled back to the weights before step {rolled_back}" in capsys.readouterr().out) is loud


class LearningRates(keras.callbacks.Callback):
    """The optimizer's learning rate at each step (after the callbacks before it set it)."""

    def on_train_begin(self, logs=None):
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate.numpy()))


def test_the_momentum_is_zeroed_at_each_shrinking_step(tmp_path):
    """SGD with momentum, the learning rate growing x4 a step after step 8: at every step where
    the threshold shrinks (the clipped norm doubled again) the update is exactly -lr * the clipped
    gradient (the momentum was zeroed first); at the other clipped steps it is not. (The overshoot
    watch, which moves the threshold without touching the momentum, is off here.)"""
    x, y = regression_data(n=STEPS * BATCH)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", use_bias=False, name="hidden"),
                              keras.layers.Dense(1, use_bias=False, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9), loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="global_clipnorm", verbose=0, update_freq=5,
                                        clip_threshold=clipping.AutoThreshold(overshoot_gain=0.0, update_gain=0.0))
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[GrowingLearningRate(SPIKE_STEP, 4.0), snapshots, monitor])
    logged = read_tags(str(tmp_path))
    written, clipped = logged["grad_norm/clip_threshold"], logged["grad_norm/global_clipped"]
    weights = snapshots.snapshots + [[v.numpy() for v in model.trainable_variables]]
    switch = monitor.clipping_events[0]["step"]
    shrinking = [s for s in sorted(written) if s > switch and written[s] < 0.99 * written[s - 1]]
    steady = [s for s in sorted(written) if s > switch and s not in shrinking]
    assert shrinking and steady
    for step in shrinking + steady:
        lr = LR * 4.0 ** (step - SPIKE_STEP + 1)
        update = np.sqrt(sum(np.sum((b - a) ** 2) for a, b in zip(weights[step - 1], weights[step])))
        if step in shrinking:
            assert update == pytest.approx(lr * clipped[step], rel=1e-4), step
        else:
            assert abs(update - lr * clipped[step]) > 1e-3 * lr * clipped[step], step


class LearningRateSpike(keras.callbacks.Callback):
    """The learning rate times `factor` for the steps in `steps`."""

    def __init__(self, steps, factor):
        super().__init__()
        self.steps, self.factor, self.seen = steps, factor, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.seen += 1
        self.model.optimizer.learning_rate.assign(LR * (self.factor if self.seen in self.steps else 1.0))


def test_the_momentum_is_zeroed_while_it_carries_the_clipped_run_uphill(tmp_path):
    """SGD with momentum; targets x1e4 at step 8 switch clipping on (no restart: replayed as is),
    then the learning rate x30 for steps 10-12 fills the momentum, which coasts on after it. The
    steps where it carries the run uphill are replayed independently (the cosine between each
    step's gradient -- a tape at the weights it saw -- and the update before it, averaged; that
    update's size against the weights'): there are some, and at each of them the update is
    exactly -lr * the clipped gradient (the momentum was zeroed first); at the other clipped steps
    after the spike it is not."""
    x, y = _data()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", use_bias=False, name="hidden"),
                              keras.layers.Dense(1, use_bias=False, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9), loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="global_clipnorm", verbose=0, update_freq=5,
                                        clip_threshold=clipping.AutoThreshold(restart_steps=0))
    spike = LearningRateSpike({10, 11, 12}, 30.0)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[spike, snapshots, monitor])
    clipped = read_tags(str(tmp_path))["grad_norm/global_clipped"]
    weights = snapshots.snapshots + [[v.numpy() for v in model.trainable_variables]]
    assert monitor.clipping_events[0]["step"] == SPIKE_STEP
    gradients, final = [], model.get_weights()
    for k, before in enumerate(snapshots.snapshots):
        model.set_weights(before)
        with tf.GradientTape() as tape:
            rows = slice(k * BATCH, (k + 1) * BATCH)
            loss = tf.reduce_mean(tf.square(model(x[rows]) - y[rows]))
        gradients.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, model.trainable_variables)]))
    model.set_weights(final)
    flat = [np.concatenate([w.ravel() for w in step]) for step in snapshots.snapshots]
    uphill = []
    _replay_overshoot(gradients, flat, SPIKE_STEP - 1, clipping.AUTO, uphill=uphill)
    carried = [SPIKE_STEP + i for i, c in enumerate(uphill) if c]
    assert carried, "the scenario must carry the run uphill at least once"
    for step in range(13, STEPS + 1):
        lr = LR * (30.0 if step in (10, 11, 12) else 1.0)
        update = np.sqrt(sum(np.sum((b - a) ** 2) for a, b in zip(weights[step - 1], weights[step])))
        zeroed = bool(update == pytest.approx(lr * clipped[step], rel=1e-4))
        assert zeroed is (step in carried), (step, carried)


class SecondMomentsBeforeEachStep(WeightsBeforeEachStep):
    """The weights and Adam's `v` slots before every step (zeros before the optimizer is built)."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.before = []

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        slots = getattr(self.model.optimizer, "_velocities", None)
        self.before.append([v.numpy().copy() for v in slots] if slots else
                           [np.zeros(v.shape, "float32") for v in self.model.trainable_variables])


@pytest.mark.parametrize("reset", [True, False])
def test_adam_second_moments_are_brought_to_the_clipped_scale_at_the_switch(tmp_path, reset):
    """Adam, a first batch of targets x8 (nothing to judge it against: applied unclipped) and a
    batch of huge targets at step 8: at the switch its `v` slots, which hold step 1, are scaled so that their total is at most threshold^2 (1 - beta_2^7),
    what clipping from the start would have let in; then Adam's own update adds the clipped
    gradient. Computed here from the slots before the step and a tape's gradient."""
    moments = SecondMomentsBeforeEachStep()
    beta_2 = 0.999
    x, y = _data()
    y[:BATCH] *= 8.0
    model, monitor, logged, _, _ = _fit(tmp_path, "global_clipnorm", keras.optimizers.Adam(0.01, beta_2=beta_2),
                                     reset_momentum=reset, extra_callbacks=[moments], data=(x, y))
    step = SPIKE_STEP
    assert monitor.clipping_events[0]["step"] == step
    t = logged["grad_norm/clip_threshold"][step]
    weights = moments.snapshots[step - 1]
    for variable, value in zip(model.trainable_variables, weights):
        variable.assign(value)
    with tf.GradientTape() as tape:
        xb, yb = x[(step - 1) * BATCH:step * BATCH], y[(step - 1) * BATCH:step * BATCH]
        loss = tf.reduce_mean(tf.square(model(xb) - yb))
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
    clipped = [g * min(1.0, t / norm) for g in grads]
    before, after = moments.before[step - 1], moments.before[step]
    limit = t ** 2 * (1 - beta_2 ** (step - 1))
    total = sum(np.sum(v) for v in before)
    assert total > 10 * limit  # step 1, unclipped, dominates them
    factor = min(1.0, limit / total) if reset else 1.0
    for v0, v1, g in zip(before, after, clipped):
        np.testing.assert_allclose(v1, beta_2 * factor * v0 + (1 - beta_2) * g ** 2, rtol=2e-4, atol=1e-12)


def _drive_policy(norms, auto, gradients=None, weights=None, uphill=None):
    """The in-graph policy (`global_clipnorm`, "auto", adaptive detector), driven eagerly step by
    step with these global norms -- or, with `gradients` and `weights` (one variable's, per step),
    with the gradients' norms and the gradients and the variable themselves, as the capture passes
    them to the overshoot watch; the threshold it clips with at each step (None before the switch).
    `uphill`: a list, given each step's verdict that the momentum carries the run uphill."""
    from gradwatch import policy, state

    rule = policy.StepPolicy(clip_mode="global_clipnorm", clip_threshold="auto", auto=auto, auto_switch=True)
    watched = gradients is not None and auto.watches_overshoot
    device = state.DeviceState(tf.distribute.get_strategy(), 1, 4, rule.initial_adaptive_state(),
                               auto_shape=(auto.window, 1), weight_shapes=[gradients[0].shape] if watched else None)
    variable = tf.Variable(tf.zeros(gradients[0].shape) if gradients is not None else 0.0)

    @tf.function
    def step(value):  # traced once: the policy's in-graph maths, as in a compiled train step
        norm = value if gradients is None else tf.norm(value)
        result = rule.decide(device, norm, tf.constant(False), tf.reshape(norm, [1]),
                             None if gradients is None else [(value, variable)])
        return result.clip_threshold[0], result.clip_active, result.uphill

    thresholds = []
    for k, value in enumerate(norms if gradients is None else gradients):
        if weights is not None:
            variable.assign(weights[k])
        threshold, active, carried = step(tf.constant(value, tf.float32))
        thresholds.append(float(threshold) if bool(active) else None)
        if uphill is not None:
            uphill.append(bool(carried))
    return thresholds


def _replay_with_elevation(norms, auto):
    """The rule written again, independently (numpy detector): percentile of the healthy window,
    capped at the baseline, times a scale that shrinks when clipped norms double, and -- the
    elevation -- halves every `recover_steps` steps while the detector's typical norm stays
    `elevation` times the one at the switch."""
    from test_detection import DEFAULTS, NumpyDetector

    detector, rows, expected = NumpyDetector(DEFAULTS), [], []
    active, base, scale, reference, typical_base = False, None, 1.0, None, None
    step_factor = auto.shrink ** (1.0 / auto.recover_steps)
    for norm in norms:
        exploded = detector.step(norm)
        window = np.sort(detector.logs[-DEFAULTS.window:])
        typical = float(np.exp(window[(len(window) - 1) // 2]))
        was_active = active
        if not exploded:
            rows.append([min(norm, auto.rise * base) if was_active else norm])
        if not active and exploded:
            active, reference, typical_base = True, norm, typical
            base = float(reference_threshold(rows[-auto.window:], auto.percentile, False)[0])
        if not active:
            expected.append(None)
            continue
        value = float(reference_threshold(rows[-auto.window:], auto.percentile, False)[0])
        if was_active and exploded and norm * auto.shrink >= reference:
            scale, reference = max(scale * min(reference / norm, auto.shrink), auto.min_scale), norm
        elif was_active and typical >= auto.elevation * typical_base:
            scale = max(scale * step_factor, auto.min_scale)
        else:
            scale = min(scale / step_factor, 1.0)
        expected.append(min(value, auto.rise * base) * scale)
    return expected


@pytest.mark.parametrize("elevation", [4.0, float("inf")])
def test_a_run_that_stays_far_above_its_healthy_scale_although_clipped_is_clipped_harder(elevation):
    """40 healthy steps, a spike (the switch), then norms creeping up 8% a step: never an explosion,
    but the detector's typical norm ends 4x the one at the switch: from then on the threshold halves
    every 16 steps. Every step's threshold equals the independent replay; with `elevation=inf` the
    threshold stays at the switch's."""
    rng = np.random.default_rng(0)
    norms = list(np.exp(rng.normal(0.0, 0.1, 40))) + [50.0] + [1.08 ** k for k in range(1, 81)]
    auto = clipping.AutoThreshold(elevation=elevation)
    got, expected = _drive_policy(norms, auto), _replay_with_elevation(norms, auto)
    assert [g is None for g in got] == [e is None for e in expected] and got[40] is not None and got[39] is None
    np.testing.assert_allclose([g for g in got if g is not None], [e for e in expected if e is not None],
                               rtol=1e-5)
    at_switch, final = got[40], got[-1]
    if elevation == float("inf"):
        assert final == pytest.approx(at_switch, rel=1e-6)
    else:
        assert final < 0.25 * at_switch  # halved at least twice
        halving = [i for i in range(41, len(got)) if got[i] < got[i - 1] * (1 - 1e-6)]
        assert halving and halving[0] > 41 + 16  # not at once: the typical norm had to climb first


def _replay_overshoot(gradients, weights, switch, auto, uphill=None):
    """The overshoot watch's factor at each step from the switch on, written again: the cosine
    between each step's gradient and the update before it (its weights minus the previous
    step's), its exponential average over `overshoot_steps`, and from the second cosine on a
    factor times `exp(-gain * (average - level))`; a second factor times `(update_ratio / ratio)
    ** update_gain`, `ratio` being that update's norm over the weights', unless it is above
    `update_ratio` but below the update before; each within [min_scale, 1], their product at
    least min_scale. `uphill`: a list, given each step's verdict that the momentum carries the run
    uphill (from the switch on: the average above `overshoot_level`, the ratio above twice `update_ratio`)."""
    average, count, factor, size, previous, factors = 0.0, 0, 1.0, 1.0, 0.0, []
    rate = 2.0 / (auto.overshoot_steps + 1.0)
    for k in range(switch, len(gradients)):
        if k > switch:
            update, gradient = weights[k] - weights[k - 1], gradients[k]
            cosine = float(np.dot(gradient, update) / (np.linalg.norm(gradient) * np.linalg.norm(update)))
            ratio = float(np.linalg.norm(update) / np.linalg.norm(weights[k]))
            average += rate * (cosine - average)
            count += 1
            if count >= 2:
                factor = min(max(factor * np.exp(-auto.overshoot_gain * (average - auto.overshoot_level)),
                                 auto.min_scale), 1.0)
            if ratio <= auto.update_ratio or ratio >= previous:  # not while already getting smaller
                size = min(max(size * (auto.update_ratio / ratio) ** auto.update_gain, auto.min_scale), 1.0)
            previous = ratio
        if uphill is not None:
            uphill.append(k > switch and average > auto.overshoot_level and ratio > 2 * auto.update_ratio)
        factors.append(max(factor * size, auto.min_scale))
    return factors


@pytest.mark.parametrize("direction, update_ratio", [(1.0, 0.001), (-1.0, 0.001), (-1.0, 1.0), (1.0, 1.0)])
def test_a_clipped_run_whose_updates_keep_overshooting_is_clipped_harder(direction, update_ratio):
    """40 healthy steps, a spike (the switch), then 80 steps of the same size whose gradient points
    along the update just made (`direction` 1: each step went too far, a cosine of about 0.6) or
    against it (-1: steps too short); each update moves the weights by about `update_ratio` of
    their norm (less as they wander away). Every step's threshold is the rule without the watch times the factor of the
    independent replay. Overshooting: it shrinks at every step from the second cosine on, down to
    `min_scale`; too short, with small updates: the factor stays 1; too short but with updates up
    to 100x the rule's `update_ratio` (a cosine that alone would leave it at 1): it shrinks for
    their size, and comes back to 1 once they are 1000x smaller (the last 40 steps). At every
    step the verdict that the momentum carries the run uphill (to be zeroed) is the replay's: only
    overshooting steps with large updates are (the last case, until the updates get small)."""
    rng = np.random.default_rng(1)
    sizes = list(np.exp(rng.normal(0.0, 0.1, 40))) + [50.0] + list(np.exp(rng.normal(0.0, 0.1, 80)))
    weights = [rng.normal(size=4).astype(np.float32) * 0.1 / update_ratio]
    for k in range(1, len(sizes)):  # the last 40 updates 1000x smaller
        weights.append(weights[-1] + rng.normal(size=4).astype(np.float32) * (0.1 if k <= 80 else 1e-4))
    gradients = []
    for k, size in enumerate(sizes):
        update = weights[k] - weights[k - 1] if k else rng.normal(size=4)
        along = direction * update / np.linalg.norm(update) + 0.5 * rng.normal(size=4) / 2
        gradients.append((size * along / np.linalg.norm(along)).astype(np.float32))
    auto = clipping.AutoThreshold(update_ratio=0.01)
    got_uphill, replayed_uphill = [], []
    got = _drive_policy(None, auto, gradients, weights, uphill=got_uphill)
    plain = _drive_policy(None, clipping.AutoThreshold(overshoot_gain=0.0, update_gain=0.0), gradients, weights)
    switch = next(i for i, g in enumerate(got) if g is not None)
    assert switch == 40 and plain[switch] is not None
    factors = _replay_overshoot(gradients, weights, switch, auto, uphill=replayed_uphill)
    assert got_uphill == [False] * switch + replayed_uphill
    np.testing.assert_allclose(got[switch:], np.array(plain[switch:]) * factors, rtol=1e-4)
    if direction > 0 and update_ratio > auto.update_ratio:  # overshooting, 10-100% updates
        assert sum(replayed_uphill[:81]) >= 30 and not any(replayed_uphill[81:])
        return
    assert not any(replayed_uphill)
    if direction > 0:
        shrinking = factors[2:factors.index(auto.min_scale)]
        assert len(shrinking) > 3 and all(b < a for a, b in zip(shrinking, shrinking[1:]))
        assert factors[-1] == auto.min_scale and got[-1] == pytest.approx(plain[-1] * auto.min_scale, rel=1e-5)
    elif update_ratio < auto.update_ratio:
        assert factors == [1.0] * len(factors) and got[switch:] == plain[switch:]
    else:  # the same short steps, but each update moving the weights by 10-100% of their norm
        assert factors[1] < 0.5 and min(factors) < 0.1 and factors[-1] == 1.0


def test_clipping_doctests():
    import doctest

    result = doctest.testmod(clipping, raise_on_error=False)
    assert result.attempted > 10 and result.failed == 0

"""Automatic clipping: the exploding step itself is clipped, measured on the weights."""

import logging

import keras
import numpy as np
import pytest

import gradwatch
from gradwatch import clipping
from helpers import WeightsBeforeEachStep, read_tags, regression_data, two_cpu_strategy

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)

LR = 0.1
SPIKE_STEP = 6


def mlp():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
                             keras.layers.Dense(1, name="out")])


def spiked(steps=10, batch_size=16, scale=1e4, nan=False):
    x, y = regression_data(n=steps * batch_size)
    rows = slice((SPIKE_STEP - 1) * batch_size, SPIKE_STEP * batch_size)
    if nan:
        x[rows.start, 0] = np.nan
    else:
        y[rows] *= scale
    return x, y


def train(tmp_path, optimizer=None, strategy=None, jit_compile=False, scale=1e4, **monitor_args):
    x, y = spiked(scale=scale)
    scope = strategy.scope() if strategy else _null()
    with scope:
        model = mlp()
        model.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse", jit_compile=jit_compile)
    snapshots = WeightsBeforeEachStep()
    monitor_args.setdefault("explosion_threshold", 200.0)
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0, update_freq=4, **monitor_args)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    weights = snapshots.snapshots + [[v.numpy() for v in model.trainable_variables]]
    deltas = [[after - before for before, after in zip(w0, w1)] for w0, w1 in zip(weights, weights[1:])]
    return model, monitor, deltas  # deltas[k - 1]: the update of step k


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def global_norm(arrays):
    return float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays)))


@pytest.mark.parametrize("mode", clipping.MODES)
def test_the_exploding_step_itself_is_clipped(mode, tmp_path):
    threshold = 0.5
    model, monitor, deltas = train(tmp_path, auto_clip=mode, clip_threshold=threshold)
    assert [(e.step, e.action) for e in monitor.explosions][0] == (SPIKE_STEP, "clipping_on")
    bound = LR * threshold * (1 + 1e-5)
    for step in range(SPIKE_STEP, len(deltas) + 1):
        delta = deltas[step - 1]
        if mode == "clipnorm":
            assert max(global_norm([d]) for d in delta) <= bound
        elif mode == "global_clipnorm":
            assert global_norm(delta) <= bound
        else:
            assert max(np.abs(d).max() for d in delta) <= bound
    # Before the explosion nothing was clipped: some update exceeded the bound.
    assert max(global_norm([d]) for d in deltas[0]) > bound or mode == "clipvalue"
    assert getattr(model.optimizer, mode) == pytest.approx(threshold)
    assert model.optimizer.get_config()[mode] == pytest.approx(threshold)
    assert monitor.clipping_events[0]["step"] == SPIKE_STEP
    logged = read_tags(str(tmp_path))
    assert logged["grad_norm/clip_threshold"][SPIKE_STEP] == pytest.approx(threshold)
    assert SPIKE_STEP - 1 not in logged["grad_norm/clip_threshold"]
    assert logged["grad_norm/global_clipped"][SPIKE_STEP] < logged["grad_norm/global"][SPIKE_STEP]


def test_switch_on_is_logged_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    train(tmp_path, auto_clip="global_clipnorm", clip_threshold=0.5)
    switches = [r for r in caplog.records if hasattr(r, "gradwatch_clipping")]
    assert len(switches) == 1
    ours = [r for r in caplog.records if r.name == "gradwatch"]
    assert ours.index(switches[0]) == 1  # right after the alert of the step that caused it
    assert ours[0].gradwatch_explosion.step == SPIKE_STEP
    assert switches[0].getMessage().startswith(
        f"switched on global_clipnorm=0.5 at step {SPIKE_STEP} (that step included), "
        f"after the gradient explosion at step {SPIKE_STEP} (global norm ")


def test_saved_model_carries_the_clipping(tmp_path):
    model, _, _ = train(tmp_path / "logs", auto_clip="clipnorm", clip_threshold=0.25)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.clipnorm == pytest.approx(0.25)


def test_nan_batch_is_skipped_weights_and_slots_unchanged(tmp_path):
    x, y = spiked(nan=True)
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    states = []

    class Capture(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            states.append([v.numpy().copy() for v in model.trainable_variables + model.optimizer.variables
                           if "iteration" not in v.path])

    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Capture(), monitor])
    for before, after in zip(states[SPIKE_STEP - 2], states[SPIKE_STEP - 1]):
        np.testing.assert_array_equal(before, after)
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    assert [(e.step, e.action) for e in monitor.explosions] == [(SPIKE_STEP, "skipped")]
    assert model.optimizer.clipnorm is None  # a NaN is not a reason to clip


def test_clipping_under_xla(tmp_path):
    _, monitor, deltas = train(tmp_path, auto_clip="global_clipnorm", clip_threshold=0.5, jit_compile=True)
    assert monitor.explosions[0].action == "clipping_on"
    assert global_norm(deltas[SPIKE_STEP - 1]) <= LR * 0.5 * (1 + 1e-5)


def test_clipping_under_mirrored_strategy_clips_the_all_reduced_gradient(tmp_path):
    strategy = two_cpu_strategy()
    model, monitor, deltas = train(tmp_path, strategy=strategy, auto_clip="global_clipnorm",
                                   clip_threshold=0.5)
    assert monitor.explosions[0].step == SPIKE_STEP
    # The bound holds for the whole update: the sum was clipped, not each replica's half.
    assert global_norm(deltas[SPIKE_STEP - 1]) == pytest.approx(LR * 0.5, rel=1e-4)


def test_clipping_under_mixed_precision_sets_the_inner_optimizer(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR), initial_scale=8.0)
    # A spike that float16 can hold (a larger one overflows: the loss-scale optimizer skips it).
    model, monitor, deltas = train(tmp_path, optimizer=optimizer, auto_clip="clipnorm", clip_threshold=0.5,
                                   scale=100.0, explosion_threshold=100.0)
    assert monitor.explosions[0].step == SPIKE_STEP
    assert model.optimizer.inner_optimizer.clipnorm == pytest.approx(0.5)
    assert max(global_norm([d]) for d in deltas[SPIKE_STEP - 1]) <= LR * 0.5 * 1.01


def test_optimizer_with_its_own_clipping_is_taken_over_and_reports_pre_clip_norms(tmp_path):
    _, monitor, deltas = train(tmp_path, optimizer=keras.optimizers.SGD(LR, global_clipnorm=0.5))
    logged = read_tags(str(tmp_path))
    assert logged["grad_norm/global"][SPIKE_STEP] > 200  # pre-clip
    assert logged["grad_norm/global_clipped"][SPIKE_STEP] == pytest.approx(0.5, rel=1e-5)
    assert monitor.explosions[0].action == "clipped"
    assert global_norm(deltas[SPIKE_STEP - 1]) <= LR * 0.5 * (1 + 1e-5)


def test_conflicting_clipping_is_rejected_before_training(tmp_path):
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(LR, clipvalue=1.0), loss="mse")
    x, y = regression_data(n=16)
    with pytest.raises(ValueError, match="auto_clip='clipnorm'.*clipvalue=1.0"):
        model.fit(x, y, verbose=0, callbacks=[gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm")])
    assert int(model.optimizer.iterations) == 0


def _textbook(optimizer, callbacks, epochs=3):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(640, 20)).astype("float32")
    y = (x @ rng.uniform(10, 100, size=(20, 1))).astype("float32")  # targets in the hundreds
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(25, activation="relu", name="hidden"),
                              keras.layers.Dense(1, name="output")])
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x[:512], y[:512], batch_size=32, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return float(model.evaluate(x[512:], y[512:], verbose=0))


def test_a_run_exploding_from_its_first_step_is_rescued_like_clipping_from_the_start(tmp_path):
    plain = _textbook(keras.optimizers.SGD(0.01, momentum=0.9), [])
    from_start = _textbook(keras.optimizers.SGD(0.01, momentum=0.9, clipnorm=1.0), [])
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", clip_threshold=1.0, verbose=0)
    rescued = _textbook(keras.optimizers.SGD(0.01, momentum=0.9), [monitor])
    assert not np.isfinite(plain) or plain > 1e6  # plain SGD diverges
    assert monitor.clipping_events[0]["step"] == 1  # norm >= 100 x clip threshold at step 1
    assert rescued <= 1.5 * from_start


class SecondMomentTotals(keras.callbacks.Callback):
    """The total of Adam's `v` slots after every step."""

    def on_train_begin(self, logs=None):
        self.totals = []

    def on_train_batch_end(self, batch, logs=None):
        self.totals.append(float(sum(np.sum(v.numpy()) for v in self.model.optimizer._velocities)))


@pytest.mark.parametrize("mirrored", [False, True])
def test_at_the_switch_adams_second_moments_hold_no_more_than_clipping_lets_in(tmp_path, mirrored):
    """Adam, `global_clipnorm=0.5` switched on at the spike: after that step the total of the
    `v` slots is at most 0.5^2 (1 - beta_2^k) after step k, the most clipping from step 1 lets
    in (the unclipped steps before held more); under MirroredStrategy too."""
    totals = SecondMomentTotals()
    strategy = two_cpu_strategy() if mirrored else None
    scope = strategy.scope() if strategy else _null()
    x, y = spiked()
    with scope:
        model = mlp()
        model.compile(optimizer=keras.optimizers.Adam(LR), loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0, auto_clip="global_clipnorm", clip_threshold=0.5,
                                        explosion_threshold=200.0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[totals, monitor])
    assert monitor.explosions[0].step == SPIKE_STEP
    bound = [0.25 * (1 - 0.999 ** k) for k in range(1, len(totals.totals) + 1)]
    assert totals.totals[SPIKE_STEP - 2] > 2 * bound[SPIKE_STEP - 2]  # before: more than clipping lets in
    for k in range(SPIKE_STEP - 1, len(bound)):
        assert totals.totals[k] <= bound[k] * (1 + 1e-5), k + 1


@pytest.mark.parametrize("mode", clipping.MODES)
def test_sparse_embedding_gradients_go_through_the_clipping_cond(mode, tmp_path):
    """Issue 22: clipping runs in one `tf.cond`; an `Embedding`'s `IndexedSlices`
    gradient passes it in every mode, and the exploding step itself is clipped."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(50, 4, name="embed"),
                              keras.layers.Flatten(), keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, (80, 5)), rng.standard_normal((80, 1)).astype("float32")
    y[(SPIKE_STEP - 1) * 8:SPIKE_STEP * 8] *= 1e4
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0, auto_clip=mode, clip_threshold=0.5,
                                        explosion_threshold=200.0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    assert [(e.step, e.action) for e in monitor.explosions][0] == (SPIKE_STEP, "clipping_on")
    before = snapshots.snapshots[SPIKE_STEP - 1]
    after = snapshots.snapshots[SPIKE_STEP] if len(snapshots.snapshots) > SPIKE_STEP else [
        v.numpy() for v in model.trainable_variables]
    delta = [b - a for a, b in zip(before, after)]
    bound = LR * 0.5 * (1 + 1e-5)
    if mode == "clipnorm":  # Keras clips the norm of the slices' values, repeated rows apart: the dense ones
        assert max(global_norm([d]) for d in delta[1:]) <= bound
    elif mode == "global_clipnorm":
        assert global_norm(delta) <= bound
    else:
        assert max(np.abs(d).max() for d in delta) <= bound


@pytest.mark.parametrize("mirrored, jit_compile", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("restart_steps", [16, 0])
def test_a_restart_takes_the_run_back_to_its_first_weights(tmp_path, mirrored, jit_compile, restart_steps):
    """"auto" with the adaptive detector, the spike at step 6 (5 healthy steps before): with
    `restart_steps=16` the switching step's clipped update (global norm: learning rate x the
    threshold) starts from the weights before step 1, on one device, under MirroredStrategy and
    under XLA; with 0, from the weights that step saw."""
    model, monitor, deltas = train(tmp_path, strategy=two_cpu_strategy() if mirrored else None, jit_compile=jit_compile,
                                   explosion_threshold=None, auto_clip="global_clipnorm",
                                   clip_threshold=clipping.AutoThreshold(restart_steps=restart_steps))
    [event] = monitor.clipping_events
    assert event["step"] == SPIKE_STEP and event.get("restarted", False) is (restart_steps > 0)
    final = [v.numpy() for v in model.trainable_variables]
    after = [w - sum(d[i] for d in deltas[SPIKE_STEP:]) for i, w in enumerate(final)]  # after the switching step
    first = [w - d for w, d in zip(after, [sum(d[i] for d in deltas[:SPIKE_STEP]) for i in range(len(final))])]
    seen = [a - d for a, d in zip(after, deltas[SPIKE_STEP - 1])]
    start = first if restart_steps else seen
    moved = global_norm([a - s for a, s in zip(after, start)])
    assert moved == pytest.approx(LR * event["threshold"], rel=1e-4)
    assert global_norm([s - f for s, f in zip(seen, first)]) > 5 * moved  # the first 5 steps moved them


@pytest.mark.parametrize("mirrored", [False, True])
def test_the_overshoot_watch_keeps_the_weights_each_step_saw(tmp_path, mirrored):
    """"auto" through `fit` (and under MirroredStrategy): the capture hands the step's gradients and
    variables to the policy, which keeps the weights for the next step while clipping is on; after
    the last step they are the weights before that step's update, and the watch's count is the
    steps after the switch but the first (each of which measured a cosine)."""
    model, monitor, deltas = train(tmp_path, strategy=two_cpu_strategy() if mirrored else None,
                                   auto_clip="global_clipnorm", clip_threshold="auto")
    assert monitor.clipping_events[0]["step"] == SPIKE_STEP
    assert clipping.AUTO.watches_overshoot  # on by default
    device = monitor._last_run[0][0].state
    before_last = [w - d for w, d in zip([v.numpy() for v in model.trainable_variables], deltas[-1])]
    for got, want in zip(device.previous_weights, before_last):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
    assert device.overshoot.numpy()[1:3].tolist() == [len(deltas) - SPIKE_STEP, 1.0]

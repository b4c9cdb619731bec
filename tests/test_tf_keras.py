"""GradientMonitor on tf_keras (Keras 2) models: fidelity, alerts, auto-clip, skip.

Same checks as `test_norms.py` / `test_alerts.py`, in the same process as
Keras 3 (`import tf_keras` lives alongside it).
"""

import logging
import math

import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch import tags
from gradwatch.capture import KerasCapture
from gradwatch.capture import TfKerasCapture, capture_class
from helpers import (assert_logged_norms_equal, expected_norms_per_step, layer_norm, read_tags,
                     regression_data, spiked_data, tape_norms, two_cpu_strategy)

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)

tf_keras = pytest.importorskip("tf_keras", reason="tf_keras is not installed")
layers = tf_keras.layers

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_tf_keras_state():
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(0)
    yield


class WeightsBeforeEachStep(tf_keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.snapshots = []

    def on_train_batch_begin(self, batch, logs=None):
        self.snapshots.append([v.numpy().copy() for v in self.model.trainable_variables])


def mse():
    return tf_keras.losses.MeanSquaredError()


# -- models -------------------------------------------------------------------
def sequential():
    return tf_keras.Sequential([tf_keras.Input((8,)), layers.Dense(16, activation="tanh", name="hidden"),
                                layers.Dense(1, name="out")], name="seq")


def functional():
    inputs = tf_keras.Input((8,))
    a = layers.Dense(16, activation="relu", name="branch_a")(inputs)
    b = layers.Dense(16, activation="tanh", name="branch_b")(inputs)
    merged = layers.Concatenate()([a, b])
    return tf_keras.Model(inputs, layers.Dense(1, name="head")(merged))


class Subclassed(tf_keras.Model):
    def __init__(self):
        super().__init__()
        self.first = layers.Dense(12, activation="relu", name="first")
        self.second = layers.Dense(1, name="second")

    def call(self, x):
        return self.second(self.first(x))


def nested():
    encoder = tf_keras.Sequential([layers.Dense(8, activation="relu", name="inner_a"),
                                   layers.Dense(4, name="inner_b")], name="encoder")
    inputs = tf_keras.Input((8,))
    return tf_keras.Model(inputs, layers.Dense(1, name="head")(encoder(inputs)))


def fit_and_compare(model, tmp_path, *, optimizer=None, jit_compile=False, expected_paths=None, steps=4):
    x, y = regression_data(n=16 * steps)
    model(x[:1])
    optimizer = optimizer or tf_keras.optimizers.SGD(0.05, momentum=0.9)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=3, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    if expected_paths is not None:
        assert monitor.layer_paths == expected_paths
    expected = expected_norms_per_step(model, snapshots.snapshots, x, y, 16, mse())
    assert len(expected) == steps
    logged = read_tags(str(tmp_path))
    assert_logged_norms_equal(logged, model, monitor.layer_paths, expected, RTOL)
    return monitor, logged


# -- adapter choice -----------------------------------------------------------
def test_adapter_is_chosen_from_the_model_class():
    import keras

    assert capture_class(sequential()) is TfKerasCapture
    assert capture_class(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])) is KerasCapture


# -- norm fidelity --------------------------------------------------------------
@pytest.mark.parametrize("build, paths", [
    (sequential, ["hidden", "out"]),
    (functional, ["branch_a", "branch_b", "head"]),
    (Subclassed, ["first", "second"]),
    (nested, ["encoder/inner_a", "encoder/inner_b", "head"]),
])
def test_norms_equal_tape_norms(build, paths, tmp_path):
    fit_and_compare(build(), tmp_path, expected_paths=paths)


def test_norms_under_xla(tmp_path):
    fit_and_compare(sequential(), tmp_path, jit_compile=True)


@pytest.mark.parametrize("optimizer", ["legacy_sgd", "adam", "legacy_adam"])
def test_norms_with_other_optimizers(optimizer, tmp_path):
    opt = {"legacy_sgd": lambda: tf_keras.optimizers.legacy.SGD(0.05, momentum=0.9),
           "adam": lambda: tf_keras.optimizers.Adam(0.01),
           "legacy_adam": lambda: tf_keras.optimizers.legacy.Adam(0.01)}[optimizer]()
    fit_and_compare(functional(), tmp_path, optimizer=opt)


def test_embedding_norms_sum_repeated_rows(tmp_path):
    # tf_keras' Embedding gradient is IndexedSlices with repeated indices (deduplicated by
    # tf_keras only after gradwatch's hook): the logged norm is that of the summed rows.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(48, 6)).astype("int32")
    y = rng.normal(size=(48, 1)).astype("float32")
    model = tf_keras.Sequential([tf_keras.Input((6,), dtype="int32"), layers.Embedding(5, 3, name="embed"),
                                 layers.Flatten(), layers.Dense(1, name="head")])
    model.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    expected = expected_norms_per_step(model, snapshots.snapshots, x, y, 16, mse())
    logged = read_tags(str(tmp_path))
    for step, (variable_norms, global_norm) in enumerate(expected, start=1):
        np.testing.assert_allclose(logged[tags.GLOBAL][step], global_norm, rtol=RTOL)
        np.testing.assert_allclose(logged["grad_norm/embed"][step],
                                   layer_norm(variable_norms, model.get_layer("embed")), rtol=RTOL)


@pytest.mark.parametrize("mirrored", [False, True])
def test_mixed_precision_hooks_the_inner_optimizer(tmp_path, mirrored):
    strategy = two_cpu_strategy() if mirrored else tf.distribute.get_strategy()
    steps = 8
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = sequential()
            # A loss scale far too large: the first steps overflow in float16 and are skipped.
            optimizer = tf_keras.mixed_precision.LossScaleOptimizer(
                tf_keras.optimizers.SGD(0.01), initial_scale=2.0 ** 18)
            model.compile(optimizer=optimizer, loss="mse")
        x, y = regression_data(n=16 * steps)
        snapshots = WeightsBeforeEachStep()
        monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
        expected = expected_norms_per_step(model, snapshots.snapshots, x, y, 16, mse())
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    logged = read_tags(str(tmp_path))
    assert int(model.optimizer.iterations.numpy()) == steps
    updated = sorted(logged[tags.GLOBAL])
    overflows = int(sum(logged[tags.OVERFLOW].values()))
    # Skipped steps are counted (written with the next update), updates logged with their norms.
    assert overflows >= 1 and updated == list(range(overflows + 1, steps + 1))
    assert min(logged[tags.OVERFLOW]) == overflows + 1
    for step in updated:  # unscaled norms (float16 forward pass)
        np.testing.assert_allclose(logged[tags.GLOBAL][step], expected[step - 1][1], rtol=1e-2)


def test_frozen_layers_not_reported(tmp_path):
    model = sequential()
    model.get_layer("hidden").trainable = False
    _, logged = fit_and_compare(model, tmp_path, expected_paths=["out"])
    assert "grad_norm/hidden" not in logged


def test_unbuilt_model_is_captured_from_its_first_step(tmp_path):
    model = tf_keras.Sequential([layers.Dense(4, name="a"), layers.Dense(1, name="b")])
    x, y = regression_data(n=48)
    model.compile(optimizer="sgd", loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.layer_paths == ["a", "b"]
    assert sorted(read_tags(str(tmp_path))["grad_norm/a"]) == [1, 2, 3]


def test_mirrored_strategy_norms_are_those_of_the_global_batch(tmp_path):
    x, y = regression_data(n=64 * 3)
    strategy = two_cpu_strategy()
    with strategy.scope():
        model = functional()
        model.compile(optimizer=tf_keras.optimizers.SGD(0.0), loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=2, verbose=0)
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))
    for step in (1, 2, 3):
        xb, yb = x[(step - 1) * 64:step * 64], y[(step - 1) * 64:step * 64]
        variable_norms, global_norm = tape_norms(model, xb, yb, mse())
        np.testing.assert_allclose(logged[tags.GLOBAL][step], global_norm, rtol=RTOL)
        np.testing.assert_allclose(logged["grad_norm/head"][step],
                                   layer_norm(variable_norms, model.get_layer("head")), rtol=RTOL)


@pytest.mark.parametrize("optimizer, skip", [("adam", False), ("adamw", True), ("legacy_adam", True)])
def test_monitoring_changes_no_weight_bit_for_bit(tmp_path, optimizer, skip):
    # With skipping on (a tf.cond around each update, weight decay moved inside it), a healthy
    # run still gives tf_keras' own weights and slots, bit for bit.
    x, y = regression_data(n=64)
    results = []
    for callbacks in ([], [gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0,
                                                     skip_nonfinite=skip)]):
        tf_keras.utils.set_random_seed(3)
        model = functional()
        opt = {"adam": lambda: tf_keras.optimizers.Adam(0.01),
               "adamw": lambda: tf_keras.optimizers.AdamW(0.01, weight_decay=0.1),
               "legacy_adam": lambda: tf_keras.optimizers.legacy.Adam(0.01)}[optimizer]()
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        results.append([v.numpy() for v in model.weights + model.optimizer.variables()])
    for plain, monitored in zip(*results):
        np.testing.assert_array_equal(plain, monitored)


# -- alerts -------------------------------------------------------------------
def fit(tmp_path, x, y, *, optimizer=None, batch_size=16, callbacks=(), steps_per_execution=1,
        **monitor_args):
    model = sequential()
    model.compile(optimizer=optimizer or tf_keras.optimizers.SGD(0.0), loss="mse",
                  steps_per_execution=steps_per_execution)
    monitor_args.setdefault("verbose", 0)
    monitor = gradwatch.GradientMonitor(str(tmp_path), **monitor_args)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=[*callbacks, monitor])
    return model, monitor


def test_absolute_threshold_flags_the_spike_step(tmp_path, caplog):
    x, y = spiked_data(steps=10, batch_size=16, spike_steps=[7])
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model, monitor = fit(tmp_path, x, y, explosion_threshold=50.0, update_freq=4)
    assert [e.step for e in monitor.explosions] == [7]
    _, expected_norm = tape_norms(model, x[96:112], y[96:112], mse())
    assert monitor.explosions[0].global_norm == pytest.approx(expected_norm, rel=1e-5)
    messages = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert len(messages) == 1 and messages[0].startswith("gradient explosion at step 7 (epoch 1)")
    assert sorted(read_tags(str(tmp_path))[tags.EXPLOSION]) == [7]


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_adaptive_threshold_catches_a_100x_spike_exactly(tmp_path, steps_per_execution):
    x, y = spiked_data(steps=96, batch_size=8, spike_steps=[83], scale=100.0)
    _, monitor = fit(tmp_path, x, y, optimizer=tf_keras.optimizers.SGD(0.01), batch_size=8,
                     update_freq=10, steps_per_execution=steps_per_execution)
    assert monitor.explosions[0].step == 83
    logged = read_tags(str(tmp_path))
    assert logged[tags.GLOBAL][83] > logged[tags.THRESHOLD][83] > logged[tags.GLOBAL][82]


# -- auto-clip and skipping ------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True])
def test_auto_clip_bounds_the_update_of_the_exploding_step(tmp_path, legacy):
    lr, threshold, spike = 0.01, 1.0, 6
    x, y = spiked_data(steps=10, batch_size=16, spike_steps=[spike], scale=1e3)
    sgd = tf_keras.optimizers.legacy.SGD(lr) if legacy else tf_keras.optimizers.SGD(lr)
    snapshots = WeightsBeforeEachStep()
    model, monitor = fit(tmp_path, x, y, optimizer=sgd, callbacks=[snapshots], update_freq=3,
                         explosion_threshold=50.0, auto_clip="clipnorm", clip_threshold=threshold)
    assert [e["step"] for e in monitor.clipping_events] == [spike]
    assert monitor.explosions[0].step == spike and monitor.explosions[0].action == "clipping_on"
    final = [v.numpy() for v in model.trainable_variables]
    after = snapshots.snapshots[1:] + [final]
    expected = expected_norms_per_step(model, snapshots.snapshots, x, y, 16, mse())
    for step, (before, after_step) in enumerate(zip(snapshots.snapshots, after), start=1):
        variable_norms, _ = expected[step - 1]
        for variable, w0, w1 in zip(model.trainable_variables, before, after_step):
            change = float(np.linalg.norm(w1 - w0))
            raw = variable_norms[id(variable)]
            if step < spike:  # not clipped yet: the plain SGD update
                np.testing.assert_allclose(change, lr * raw, rtol=1e-4)
            else:  # clipped from the exploding step itself, per variable
                assert change <= lr * threshold * (1 + 1e-5)
                np.testing.assert_allclose(change, lr * min(raw, threshold), rtol=1e-4)
    assert expected[spike - 1][1] > 50.0
    assert getattr(model.optimizer, "clipnorm") == threshold  # reported on the optimizer
    logged = read_tags(str(tmp_path))
    assert logged[tags.CLIP_THRESHOLD][spike] == threshold and spike - 1 not in logged[tags.CLIP_THRESHOLD]


@pytest.mark.parametrize("legacy", [False, True])
def test_auto_threshold_and_momentum_reset(tmp_path, legacy):
    """`clip_threshold="auto"` follows the run and `reset_momentum` zeroes SGD's momentum at the
    switch: the switching step then moves the weights by exactly lr * threshold."""
    lr, spike = 0.01, 6
    x, y = spiked_data(steps=10, batch_size=16, spike_steps=[spike], scale=1e3)
    sgd = (tf_keras.optimizers.legacy.SGD if legacy else tf_keras.optimizers.SGD)(lr, momentum=0.9)
    snapshots = WeightsBeforeEachStep()
    model, monitor = fit(tmp_path, x, y, optimizer=sgd, callbacks=[snapshots], update_freq=3,
                         explosion_threshold=50.0, auto_clip="global_clipnorm", clip_threshold="auto",
                         reset_momentum=True)
    assert [e["step"] for e in monitor.clipping_events] == [spike]
    written = read_tags(str(tmp_path))[tags.CLIP_THRESHOLD]
    assert sorted(written) == list(range(spike, 11))
    after = snapshots.snapshots[spike] if len(snapshots.snapshots) > spike else None
    before = snapshots.snapshots[spike - 1]
    change = np.sqrt(sum(np.sum((w1 - w0) ** 2) for w0, w1 in zip(before, after)))
    np.testing.assert_allclose(change, lr * written[spike], rtol=1e-4)
    assert model.optimizer.global_clipnorm == pytest.approx(written[10])
    # The overshoot watch ran at every step after the switch and kept the weights the last one saw.
    device = monitor._last_run[0][0].state
    assert device.overshoot.numpy()[1] == 10 - spike
    for kept, weights in zip(device.previous_weights, snapshots.snapshots[-1]):
        np.testing.assert_array_equal(kept.numpy(), weights)


@pytest.mark.parametrize("legacy", [False, True])
def test_auto_threshold_restarts_a_run_in_trouble_from_its_start(tmp_path, legacy):
    """The adaptive detector switches "auto" clipping on at step 6 (5 healthy steps before, fewer
    than `restart_steps`): the switching step's update, lr x the threshold (momentum zeroed),
    starts from the weights before step 1."""
    lr, spike = 0.01, 6
    x, y = spiked_data(steps=10, batch_size=16, spike_steps=[spike], scale=1e3)
    sgd = (tf_keras.optimizers.legacy.SGD if legacy else tf_keras.optimizers.SGD)(lr, momentum=0.9)
    snapshots = WeightsBeforeEachStep()
    model, monitor = fit(tmp_path, x, y, optimizer=sgd, callbacks=[snapshots], update_freq=3,
                         auto_clip="global_clipnorm", clip_threshold="auto")
    assert [(e["step"], e.get("restarted")) for e in monitor.clipping_events] == [(spike, True)]
    threshold = read_tags(str(tmp_path))[tags.CLIP_THRESHOLD][spike]
    first, seen, after = snapshots.snapshots[0], snapshots.snapshots[spike - 1], snapshots.snapshots[spike]
    change = np.sqrt(sum(np.sum((w1 - w0) ** 2) for w0, w1 in zip(first, after)))
    np.testing.assert_allclose(change, lr * threshold, rtol=1e-4)
    assert np.sqrt(sum(np.sum((w1 - w0) ** 2) for w0, w1 in zip(first, seen))) > 3 * change


@pytest.mark.parametrize("legacy", [False, True])
def test_auto_threshold_rolls_back_after_a_build_up(tmp_path, legacy):
    """`AutoThreshold(restart_steps=2, rollback_steps=3)`: targets x6 at step 9 (a loud step under
    the threshold), x1e3 at step 10 (the switch). The run rolls back to the weights kept last (the
    first step's, then the first quiet step 3 or more after the last kept, replayed from the logged
    norms and thresholds): the switching step's update from them is lr x the threshold (momentum
    zeroed), recorded with that step."""
    lr, loud, spike = 0.01, 9, 10
    x, y = spiked_data(steps=14, batch_size=16, spike_steps=[spike], scale=1e3)
    y[(loud - 1) * 16:loud * 16] *= 6.0
    sgd = (tf_keras.optimizers.legacy.SGD if legacy else tf_keras.optimizers.SGD)(lr, momentum=0.9)
    snapshots = WeightsBeforeEachStep()
    rule = gradwatch.AutoThreshold(restart_steps=2, rollback_steps=3)
    model, monitor = fit(tmp_path, x, y, optimizer=sgd, callbacks=[snapshots], update_freq=3,
                         auto_clip="global_clipnorm", clip_threshold=rule)
    logged = read_tags(str(tmp_path))
    norms, thresholds = logged[tags.GLOBAL], logged[tags.THRESHOLD]
    assert norms[loud] >= rule.rollback_level * thresholds[spike] and norms[loud] < thresholds[loud]
    kept = [1]
    for step in range(2, spike):
        if step - kept[-1] >= 3 and norms[step] < rule.rollback_level * thresholds[step]:
            kept.append(step)
    assert len(kept) > 1
    assert [(e["step"], e.get("restarted"), e.get("restart_step")) for e in monitor.clipping_events] == [
        (spike, True, kept[-1])]
    start, after = snapshots.snapshots[kept[-1] - 1], snapshots.snapshots[spike]
    change = np.sqrt(sum(np.sum((w1 - w0) ** 2) for w0, w1 in zip(start, after)))
    np.testing.assert_allclose(change, lr * logged[tags.CLIP_THRESHOLD][spike], rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "legacy_adam"])
def test_nonfinite_step_is_skipped_leaving_weights_and_slots(tmp_path, optimizer, caplog):
    opt = {"adam": lambda: tf_keras.optimizers.Adam(0.01),
           "adamw": lambda: tf_keras.optimizers.AdamW(0.01, weight_decay=0.1),
           "legacy_adam": lambda: tf_keras.optimizers.legacy.Adam(0.01)}[optimizer]()
    x, y = spiked_data(steps=6, batch_size=16, spike_steps=[], nan_steps=[4])

    class SlotsBeforeEachStep(tf_keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.snapshots = []

        def on_train_batch_begin(self, batch, logs=None):
            variables = self.model.trainable_variables + _slots(self.model.optimizer)
            self.snapshots.append([v.numpy().copy() for v in variables])

    slots = SlotsBeforeEachStep()
    model, monitor = fit(tmp_path, x, y, optimizer=opt, callbacks=[slots],
                         explosion_threshold=1e9, skip_nonfinite=True)
    assert [e.step for e in monitor.explosions] == [4]
    assert monitor.explosions[0].action == "skipped" and math.isnan(monitor.explosions[0].global_norm)
    before_4, before_5 = slots.snapshots[3], slots.snapshots[4]
    assert any(np.any(a != b) for a, b in zip(slots.snapshots[2], before_4))  # step 3 did update
    for a, b in zip(before_4, before_5):
        np.testing.assert_array_equal(a, b)  # step 4: nothing moved, not even the decay
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)
    assert int(model.optimizer.iterations.numpy()) == 6  # the skipped step still counts


def _slots(optimizer):
    variables = optimizer.variables() if callable(optimizer.variables) else optimizer.variables
    return [v for v in variables if "iter" not in v.name]

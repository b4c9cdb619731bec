"""Logged norms equal norms computed independently with tf.GradientTape."""

import keras
import numpy as np
import pytest

import gradwatch
from gradwatch import tags
from helpers import (WeightsBeforeEachStep, assert_logged_norms_equal, expected_norms_per_step,
                     layer_norm, read_tags, regression_data)

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)

RTOL = 1e-5


def sequential():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
                             keras.layers.Dense(1, name="out")], name="seq")


def functional():
    inputs = keras.Input((8,))
    a = keras.layers.Dense(16, activation="relu", name="branch_a")(inputs)
    b = keras.layers.Dense(16, activation="tanh", name="branch_b")(inputs)
    merged = keras.layers.Concatenate()([a, b])
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(merged))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(12, activation="relu", name="first")
        self.second = keras.layers.Dense(1, name="second")

    def call(self, x):
        return self.second(self.first(x))


def nested():
    encoder = keras.Sequential([keras.layers.Dense(8, activation="relu", name="inner_a"),
                                keras.layers.Dense(4, name="inner_b")], name="encoder")
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(encoder(inputs)))


def fit_and_compare(model, tmp_path, *, jit_compile=False, expected_paths=None, steps=4, update_freq=3):
    x, y = regression_data(n=16 * steps)
    model(x[:1])  # weights exist before the first step, so they can be snapshot
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse",
                  jit_compile=jit_compile)
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=update_freq, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    if expected_paths is not None:
        assert monitor.layer_paths == expected_paths
    expected = expected_norms_per_step(model, snapshots.snapshots, x, y, 16)
    assert len(expected) == steps
    logged = read_tags(str(tmp_path))
    assert_logged_norms_equal(logged, model, monitor.layer_paths, expected, RTOL)
    return monitor, logged


@pytest.mark.parametrize("build, paths", [
    (sequential, ["hidden", "out"]),
    (functional, ["branch_a", "branch_b", "head"]),
    (Subclassed, ["first", "second"]),
    (nested, ["encoder/inner_a", "encoder/inner_b", "head"]),
])
def test_norms_equal_tape_norms(build, paths, tmp_path):
    fit_and_compare(build(), tmp_path, expected_paths=paths)


# update_freq=1: each step's record comes back as an output of the step, not from the device buffer.
@pytest.mark.parametrize("build", [sequential, Subclassed, nested])
def test_norms_equal_tape_norms_read_every_step(build, tmp_path):
    monitor, _ = fit_and_compare(build(), tmp_path, update_freq=1)
    capture, = monitor._last_run[0]
    assert capture.return_records and capture.latest_record is None  # used, then taken by the drain


@pytest.mark.parametrize("update_freq", [1, 3])
def test_norms_under_xla(tmp_path, update_freq):
    fit_and_compare(sequential(), tmp_path, jit_compile=True, update_freq=update_freq)


def test_rnn_cell_reported_under_rnn_layer(tmp_path):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.GRU(4, name="gru"),
                              keras.layers.Dense(1, name="out")])
    x = np.random.default_rng(0).normal(size=(32, 5, 3)).astype("float32")
    y = x.sum(axis=(1, 2))[:, None].astype("float32")
    model.compile(optimizer="sgd", loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    assert monitor.layer_paths == ["gru", "out"]
    expected = expected_norms_per_step(model, snapshots.snapshots, x, y, 16)
    logged = read_tags(str(tmp_path))
    for step, (variable_norms, _) in enumerate(expected, start=1):
        np.testing.assert_allclose(logged["grad_norm/gru"][step],
                                   layer_norm(variable_norms, model.get_layer("gru")), rtol=RTOL)


def test_frozen_layers_not_reported(tmp_path):
    model = sequential()
    model.get_layer("hidden").trainable = False
    _, logged = fit_and_compare(model, tmp_path, expected_paths=["out"])
    assert "grad_norm/hidden" not in logged


def test_monitoring_changes_no_weight_bit_for_bit(tmp_path):
    x, y = regression_data(n=64)
    results = []
    for callbacks in ([], [gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0)]):
        keras.utils.set_random_seed(3)
        model = functional()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        results.append([v.numpy() for v in model.weights + model.optimizer.variables])
    for plain, monitored in zip(*results):
        np.testing.assert_array_equal(plain, monitored)


def test_unbuilt_model_is_captured_from_its_first_step(tmp_path):
    model = keras.Sequential([keras.layers.Dense(4, name="a"), keras.layers.Dense(1, name="b")])
    x, y = regression_data(n=48)
    model.compile(optimizer="sgd", loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.layer_paths == ["a", "b"]
    logged = read_tags(str(tmp_path))
    assert sorted(logged[tags.GLOBAL]) == [1, 2, 3]
    assert sorted(logged["grad_norm/a"]) == [1, 2, 3]


class OwnTrainStep(keras.Model):
    """A custom `train_step` (GAN-style loops look like this): its own loss and logs."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(6, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y, self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"my_loss": loss}


@pytest.mark.parametrize("update_freq", [1, 3])
def test_custom_train_step_norms_equal_tape_norms(tmp_path, update_freq):
    model = OwnTrainStep()
    monitor, _ = fit_and_compare(model, tmp_path, update_freq=update_freq)
    assert monitor.layer_paths == ["hidden", "out"]
    assert sorted(model.history.history) == ["my_loss"]  # nothing of gradwatch in the logs


class Block(keras.layers.Layer):
    """A layer (not a model) of three sublayers, like a small transformer block."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense_a = keras.layers.Dense(8, activation="tanh", name="dense_a")
        self.dense_b = keras.layers.Dense(8, name="dense_b")
        self.norm = keras.layers.LayerNormalization(name="norm")

    def build(self, input_shape):
        self.dense_a.build(input_shape)
        self.dense_b.build((None, 8))
        self.norm.build((None, 8))

    def call(self, x):
        return self.norm(x + self.dense_b(self.dense_a(x)))


def blocks_in_nested_model():
    inner = keras.Sequential([keras.Input((8,)), Block(name="block_0"), Block(name="block_1")], name="encoder")
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(inner(inputs)))


def test_partly_frozen_block_reports_each_trainable_sublayer(tmp_path):
    """`outer.trainable = False; inner.trainable = True`: the row is the inner layer
    (Keras gives `[]` for the frozen block's trainable variables)."""
    model = blocks_in_nested_model()
    for name in ("block_0", "block_1"):
        block = model.get_layer("encoder").get_layer(name)
        block.trainable = False
        block.dense_a.trainable = True
        block.norm.trainable = True
    fit_and_compare(model, tmp_path, expected_paths=[
        "encoder/block_0/dense_a", "encoder/block_0/norm", "encoder/block_1/dense_a", "encoder/block_1/norm",
        "head"])


def test_sublayers_reports_sublayers_apart(tmp_path):
    from gradwatch import stats

    model = blocks_in_nested_model()
    assert stats.layer_paths(model)[0] == ["encoder/block_0", "encoder/block_1", "head"]  # the default
    sublayers, paths = 1, ["encoder/block_0/dense_a", "encoder/block_0/dense_b", "encoder/block_0/norm",
                           "encoder/block_1/dense_a", "encoder/block_1/dense_b", "encoder/block_1/norm", "head"]
    x, y = regression_data(n=48)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), sublayers=sublayers, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    assert monitor.layer_paths == paths
    expected = expected_norms_per_step(model, snapshots.snapshots, x, y, 16)
    assert_logged_norms_equal(read_tags(str(tmp_path)), model, paths, expected, RTOL)


def test_two_layers_of_one_name_are_two_rows():
    from gradwatch import stats

    class Twice(keras.layers.Layer):
        def __init__(self):
            super().__init__(name="twice")
            self.first, self.second = keras.layers.Dense(2, name="d"), keras.layers.Dense(2, name="d")

        def call(self, x):
            return self.second(self.first(x))

    model = keras.Sequential([keras.Input((3,)), Twice()])
    paths, layer_of = stats.layer_paths(model, sublayers=1)
    assert paths == ["twice/d", "twice/d_2"]
    twice = model.layers[0]
    assert [layer_of[id(v)] for v in twice.first.weights + twice.second.weights] == [0, 0, 1, 1]

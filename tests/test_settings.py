"""Norm fidelity in the harder settings: distribution, multi-step execution,
mixed precision, gradient accumulation, sparse and missing gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch import tags
from helpers import read_tags, regression_data, tape_norms, two_cpu_strategy

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)


def mlp(name="mlp"):
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
                             keras.layers.Dense(1, name="out")], name=name)


def frozen_weights_norms(model, x, y, batch_size):
    """Global norm of each batch at fixed weights (the runs use learning rate 0)."""
    return [tape_norms(model, x[i:i + batch_size], y[i:i + batch_size])[1]
            for i in range(0, len(x), batch_size)]


def test_mirrored_strategy_logs_the_all_reduced_norm(tmp_path):
    x, y = regression_data(n=128)
    strategy = two_cpu_strategy()
    with strategy.scope():
        model = mlp()
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))[tags.GLOBAL]
    expected = frozen_weights_norms(model, x, y, 64)  # single device, same global batch
    np.testing.assert_allclose([logged[1], logged[2]], expected, rtol=1e-5)


def test_steps_per_execution_logs_every_step(tmp_path):
    x, y = regression_data(n=16 * 8)
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", steps_per_execution=4)
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))[tags.GLOBAL]
    assert sorted(logged) == list(range(1, 9))
    np.testing.assert_allclose([logged[s] for s in range(1, 9)],
                               frozen_weights_norms(model, x, y, 16), rtol=1e-5)


def test_gradient_accumulation_logs_the_applied_mean(tmp_path):
    x, y = regression_data(n=16 * 4)
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(0.0, gradient_accumulation_steps=2), loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))[tags.GLOBAL]
    # Two updates: `optimizer.iterations` counts updates, not micro-batches.
    assert sorted(logged) == [1, 2]
    assert int(model.optimizer.iterations) == 2
    for step, start in ((1, 0), (2, 32)):
        grads = []
        for i in (start, start + 16):
            with tf.GradientTape() as tape:
                loss = keras.losses.MeanSquaredError()(y[i:i + 16], model(x[i:i + 16]))
            grads.append(tape.gradient(loss, model.trainable_variables))
        mean = [(a + b) / 2 for a, b in zip(*grads)]
        np.testing.assert_allclose(logged[step], float(tf.linalg.global_norm(mean)), rtol=1e-5)


def test_embedding_norm_combines_repeated_indices(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(32, 6))  # few ids: many repeats per batch
    targets = rng.normal(size=(32, 1)).astype("float32")
    model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(5, 3, name="embed"),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(tokens, targets, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))
    for step, start in ((1, 0), (2, 16)):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(targets[start:start + 16], model(tokens[start:start + 16]))
        grad = tape.gradient(loss, model.get_layer("embed").embeddings)
        assert isinstance(grad, tf.IndexedSlices)
        np.testing.assert_allclose(logged["grad_norm/embed"][step],
                                   float(tf.norm(tf.convert_to_tensor(grad))), rtol=1e-5)


class UsesOneBranch(keras.Model):
    def __init__(self):
        super().__init__()
        self.used = keras.layers.Dense(1, name="used")
        self.unused = keras.layers.Dense(1, name="unused")

    def call(self, x):
        return self.used(x)


def test_variable_without_gradient_does_not_break(tmp_path):
    model = UsesOneBranch()
    model(np.zeros((1, 8), "float32"))
    model.unused.build((None, 8))  # trainable, but never in the loss
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    x, y = regression_data(n=32)
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))
    np.testing.assert_allclose([logged[tags.GLOBAL][1], logged[tags.GLOBAL][2]],
                               frozen_weights_norms(model, x, y, 16), rtol=1e-5)
    # The optimizer never updates it (Keras drops its `None` gradient): not a layer
    # of the step, so never written as a zero norm.
    assert "grad_norm/unused" not in logged and monitor.layer_paths == ["used"]


def test_mixed_precision_logs_unscaled_norms_and_overflow_steps(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    model = mlp()
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=8.0)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = regression_data(n=48)
    x[16:32] *= 1e5  # fp16 overflow in the scaled gradient of the second batch
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))
    assert logged[tags.OVERFLOW] == {2: 1.0}  # skipped by the loss-scale optimizer
    assert sorted(logged[tags.GLOBAL]) == [1, 2]  # two real updates, steps 1 and 2
    expected = [tape_norms(model, x[i:i + 16], y[i:i + 16])[1] for i in (0, 32)]
    np.testing.assert_allclose([logged[tags.GLOBAL][1], logged[tags.GLOBAL][2]], expected, rtol=2e-2)
    assert monitor.explosions == []  # an overflow is not an explosion

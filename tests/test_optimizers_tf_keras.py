"""tf_keras (Keras 2) models with several optimizers and custom loops: the same
checks as `test_optimizers.py` (GANs apply `self.d_optimizer` and
`self.g_optimizer` in tf_keras too)."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch import tags
from helpers import read_tags
from test_optimizers import gan_train_step

tf_keras = pytest.importorskip("tf_keras", reason="tf_keras is not installed")
layers = tf_keras.layers

LATENT, FEATURES, BATCH, STEPS = 4, 6, 16, 6
RTOL = 2e-5


@pytest.fixture(autouse=True)
def _fresh_tf_keras_state():
    tf_keras.backend.clear_session()
    yield


class GAN(tf_keras.Model):
    """A least-squares GAN in keras-io's shape; noise comes with the data. With
    `record`, the eager reference appends each step's tape norms."""

    def __init__(self, record=None):
        super().__init__()
        self.generator = tf_keras.Sequential([tf_keras.Input((LATENT,)), layers.Dense(8, activation="relu", name="g_hidden"),
                                              layers.Dense(FEATURES, name="g_out")], name="generator")
        self.discriminator = tf_keras.Sequential([tf_keras.Input((FEATURES,)),
                                                  layers.Dense(8, activation="relu", name="d_hidden"),
                                                  layers.Dense(1, name="d_out")], name="discriminator")
        self.record = None if record is None else record.append

    def compile(self, d_optimizer, g_optimizer, **kwargs):
        super().compile(**kwargs)
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = tf_keras.losses.MeanSquaredError()

    def train_step(self, data):
        return gan_train_step(self, data)


def gan_data():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(STEPS * BATCH, FEATURES)).astype("float32")
    z1 = rng.normal(size=(STEPS * BATCH, LATENT)).astype("float32")
    z2 = rng.normal(size=(STEPS * BATCH, LATENT)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((real, (z1, z2))).batch(BATCH)


def train_gan(compile_with_g, legacy, callbacks=(), record=None):
    tf_keras.utils.set_random_seed(3)
    gan = GAN(record)
    optimizers = tf_keras.optimizers.legacy if legacy else tf_keras.optimizers
    d_opt, g_opt = optimizers.SGD(0.05), optimizers.Adam(0.05)
    kwargs = {"optimizer": g_opt} if compile_with_g else {}
    gan.compile(d_optimizer=d_opt, g_optimizer=g_opt, run_eagerly=record is not None, **kwargs)
    gan.fit(gan_data(), epochs=1, verbose=0, callbacks=list(callbacks))
    return gan


@pytest.mark.parametrize("compile_with_g, legacy", [(False, False), (True, False), (False, True)],
                         ids=["compile()", "compile(optimizer=g_opt)", "legacy optimizers"])
def test_tf_keras_gan_each_optimizer_norms_equal_tape_norms(tmp_path, compile_with_g, legacy, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    reference = []
    train_gan(compile_with_g, legacy, record=reference)
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=2, verbose=0)
    train_gan(compile_with_g, legacy, [monitor])

    assert sorted(os.listdir(tmp_path / "train")) == ["d_optimizer", "g_optimizer"]
    for name in ("d_optimizer", "g_optimizer"):
        logged = read_tags(str(tmp_path), run=f"train/{name}")
        assert sorted(logged[tags.GLOBAL]) == list(range(1, STEPS + 1))
        written = {tags.layer_of_tag(t) for t in logged if tags.layer_of_tag(t)}
        assert written == set(reference[0][name][1])
        for step, expected in enumerate(reference, start=1):
            global_norm, per_layer = expected[name]
            np.testing.assert_allclose(logged[tags.GLOBAL][step], global_norm, rtol=RTOL)
            for path, norm in per_layer.items():
                np.testing.assert_allclose(logged[tags.layer_tag(path)][step], norm, rtol=RTOL)
    # gradwatch says nothing (TensorFlow may warn of retracing, depending on the tests run before)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("gradwatch")]


@pytest.mark.parametrize("jit_compile", [False, True], ids=["plain", "xla"])
def test_tf_keras_custom_loop_with_callback_list(tmp_path, jit_compile):
    tf_keras.utils.set_random_seed(4)
    model = tf_keras.Sequential([tf_keras.Input((FEATURES,)), layers.Dense(8, activation="tanh", name="hidden"),
                                 layers.Dense(1, name="out")], name="net")
    optimizer = tf_keras.optimizers.Adam(0.01)
    loss_fn = tf_keras.losses.MeanSquaredError()

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return tf.linalg.global_norm(grads)

    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=2, optimizers=[optimizer], verbose=0)
    callbacks = tf_keras.callbacks.CallbackList([monitor], model=model)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(STEPS, BATCH, FEATURES)).astype("float32")
    y = (x.sum(axis=-1, keepdims=True) ** 2).astype("float32")
    expected = []
    callbacks.on_train_begin()
    for step in range(STEPS):
        callbacks.on_train_batch_begin(step)  # tf_keras' CallbackList times batches: it needs both
        expected.append(float(train_step(x[step], y[step])))
        callbacks.on_train_batch_end(step)
    callbacks.on_train_end()
    logged = read_tags(str(tmp_path))
    assert monitor.layer_paths == ["hidden", "out"]
    np.testing.assert_allclose([logged[tags.GLOBAL][s] for s in range(1, STEPS + 1)], expected, rtol=RTOL)

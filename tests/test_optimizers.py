"""Every optimizer a model trains with: a GAN's two optimizers (keras-io's
pattern: a custom `train_step` applying `self.d_optimizer` and
`self.g_optimizer`), and custom training loops driven through `CallbackList`.

References are independent: each network's gradient is taken with
`tf.GradientTape` in an eager replay of the same training (same seed, data
and optimizers), and the logs are read with TensorBoard's own loader."""

import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch import tags
from helpers import read_tags

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)

LATENT, FEATURES, BATCH, STEPS = 4, 6, 16, 6
RTOL = 2e-5


def make_networks():
    generator = keras.Sequential([keras.Input((LATENT,)), keras.layers.Dense(8, activation="relu", name="g_hidden"),
                                  keras.layers.Dense(FEATURES, name="g_out")], name="generator")
    discriminator = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu", name="d_hidden"),
                                      keras.layers.Dense(1, name="d_out")], name="discriminator")
    return generator, discriminator


def layer_norms(grads, variables, network):
    """`{"<network>/<layer>": norm}` of a network's gradient, from the tape's gradients."""
    by_id = {id(v): g for g, v in zip(grads, variables)}
    return {f"{network.name}/{layer.name}": float(tf.linalg.global_norm([by_id[id(v)] for v in layer.trainable_variables]))
            for layer in network.layers}


class GAN(keras.Model):
    """keras-io's GAN shape; the noise comes with the data, so that two runs match step for step.
    With `record`, the eager reference: each step appends the tape's norms."""

    def __init__(self, record=None):
        super().__init__()
        self.generator, self.discriminator = make_networks()
        self.record = None if record is None else record.append  # (a list attribute would be copied)

    def compile(self, d_optimizer, g_optimizer, **kwargs):
        super().compile(**kwargs)
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.MeanSquaredError()  # a least-squares GAN

    def train_step(self, data):
        return gan_train_step(self, data)


def gan_train_step(gan, data):
    """keras-io's GAN step (least squares): the discriminator's update, then the
    generator's; with `gan.record`, each network's tape norms are recorded."""
    real, (z1, z2) = data[0], data[1]
    fake = gan.generator(z1)
    combined = tf.concat([fake, real], axis=0)
    labels = tf.concat([tf.ones((tf.shape(fake)[0], 1)), tf.zeros((tf.shape(real)[0], 1))], axis=0)
    with tf.GradientTape() as tape:
        d_loss = gan.loss_fn(labels, gan.discriminator(combined))
    d_vars = gan.discriminator.trainable_weights
    d_grads = tape.gradient(d_loss, d_vars)
    gan.d_optimizer.apply_gradients(zip(d_grads, d_vars))
    with tf.GradientTape() as tape:
        g_loss = gan.loss_fn(tf.zeros((tf.shape(z2)[0], 1)), gan.discriminator(gan.generator(z2)))
    g_vars = gan.generator.trainable_weights
    g_grads = tape.gradient(g_loss, g_vars)
    gan.g_optimizer.apply_gradients(zip(g_grads, g_vars))
    if gan.record is not None:
        gan.record({
            "d_optimizer": (float(tf.linalg.global_norm(d_grads)), layer_norms(d_grads, d_vars, gan.discriminator)),
            "g_optimizer": (float(tf.linalg.global_norm(g_grads)), layer_norms(g_grads, g_vars, gan.generator))})
    return {"d_loss": d_loss, "g_loss": g_loss}


def gan_data(steps=STEPS, spike_step=None):
    rng = np.random.default_rng(1)
    real = rng.normal(size=(steps * BATCH, FEATURES)).astype("float32")
    if spike_step is not None:
        real[(spike_step - 1) * BATCH:spike_step * BATCH] *= 1e3
    z1 = rng.normal(size=(steps * BATCH, LATENT)).astype("float32")
    z2 = rng.normal(size=(steps * BATCH, LATENT)).astype("float32")
    return real, (z1, z2)


def train_gan(compile_with_g, callbacks=(), record=None, data=None, lr=0.05):
    keras.utils.set_random_seed(3)
    gan = GAN(record)
    d_opt, g_opt = keras.optimizers.SGD(lr), keras.optimizers.Adam(lr)
    kwargs = {"optimizer": g_opt} if compile_with_g else {}
    gan.compile(d_optimizer=d_opt, g_optimizer=g_opt, run_eagerly=record is not None, **kwargs)
    x, y = data or gan_data()
    gan.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks))
    return gan


@pytest.mark.parametrize("compile_with_g", [False, True], ids=["compile()", "compile(optimizer=g_opt)"])
def test_gan_each_optimizer_norms_equal_tape_norms_per_step(tmp_path, compile_with_g, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    reference = []
    train_gan(compile_with_g, record=reference)
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=2, verbose=0)
    train_gan(compile_with_g, [monitor])

    runs = sorted(os.listdir(tmp_path / "train"))
    assert runs == ["d_optimizer", "g_optimizer"]  # nothing for compile()'s unused default optimizer
    assert monitor.layer_paths == {"d_optimizer": ["discriminator/d_hidden", "discriminator/d_out"],
                                   "g_optimizer": ["generator/g_hidden", "generator/g_out"]}
    for name in ("d_optimizer", "g_optimizer"):
        logged = read_tags(str(tmp_path), run=f"train/{name}")
        assert sorted(logged[tags.GLOBAL]) == list(range(1, STEPS + 1))
        own_layers = set(reference[0][name][1])
        written = {tags.layer_of_tag(t) for t in logged if tags.layer_of_tag(t)}
        assert written == own_layers  # the other network's layers never appear (as zeros or at all)
        for step, expected in enumerate(reference, start=1):
            global_norm, per_layer = expected[name]
            np.testing.assert_allclose(logged[tags.GLOBAL][step], global_norm, rtol=RTOL)
            for path, norm in per_layer.items():
                np.testing.assert_allclose(logged[tags.layer_tag(path)][step], norm, rtol=RTOL)
                assert norm > 0
    # gradwatch says nothing (TensorFlow may warn of retracing, depending on the tests run before)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("gradwatch")]


def test_gan_auto_clip_switches_on_for_the_exploding_optimizer_only(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    spike, lr, threshold = 4, 0.05, 1.0
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=1, explosion_threshold=50.0,
                                        auto_clip="global_clipnorm", clip_threshold=threshold, verbose=0)
    snapshots = []

    class DiscriminatorWeights(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            snapshots.append([v.numpy().copy() for v in self.model.discriminator.trainable_variables])

    gan = train_gan(False, [DiscriminatorWeights(), monitor], data=gan_data(spike_step=spike), lr=lr)

    assert [(e.step, e.optimizer, e.action) for e in monitor.explosions] == [(spike, "d_optimizer", "clipping_on")]
    assert [(c["step"], c["optimizer"]) for c in monitor.clipping_events] == [(spike, "d_optimizer")]
    assert gan.d_optimizer.global_clipnorm == threshold and gan.g_optimizer.global_clipnorm is None
    # The exploding step itself was clipped: SGD moved the discriminator by lr x threshold.
    after = [v.numpy() for v in gan.discriminator.trainable_variables]
    moved = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(snapshots[spike], snapshots[spike - 1])))
    np.testing.assert_allclose(moved, lr * threshold, rtol=1e-4)
    assert all(np.isfinite(a).all() for a in after)
    d_logged = read_tags(str(tmp_path), run="train/d_optimizer")
    g_logged = read_tags(str(tmp_path), run="train/g_optimizer")
    assert d_logged[tags.EXPLOSION] == {spike: 1.0} and tags.EXPLOSION not in g_logged
    assert sorted(d_logged[tags.CLIP_THRESHOLD]) == list(range(spike, STEPS + 1))
    assert tags.CLIP_THRESHOLD not in g_logged
    lines = [r.getMessage() for r in caplog.records if hasattr(r, "gradwatch_explosion")]
    assert len(lines) == 1 and lines[0].startswith(f"[d_optimizer] gradient explosion at step {spike} ")


def make_loop_model():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                             keras.layers.Dense(1, name="out")], name="net")


def loop_data(steps=STEPS, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps, BATCH, FEATURES)).astype("float32")
    y = (x.sum(axis=-1, keepdims=True) ** 2).astype("float32")
    return x, y


def make_step(model, optimizer, jit_compile):
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        per_layer = tf.stack([tf.linalg.global_norm(grads[0:2]), tf.linalg.global_norm(grads[2:4])])
        return tf.linalg.global_norm(grads), per_layer  # the tape's own norms, as the step saw them

    return train_step


@pytest.mark.parametrize("jit_compile", [False, True], ids=["plain", "xla"])
def test_custom_loop_with_callback_list_records_every_step(tmp_path, jit_compile):
    keras.utils.set_random_seed(4)
    model, optimizer = make_loop_model(), keras.optimizers.Adam(0.01)
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=2, optimizers=[optimizer], verbose=0)
    callbacks = keras.callbacks.CallbackList([monitor], model=model)
    train_step = make_step(model, optimizer, jit_compile)
    x, y = loop_data()
    expected = []
    callbacks.on_train_begin()
    for step in range(STEPS):
        global_norm, per_layer = train_step(x[step], y[step])
        expected.append((float(global_norm), per_layer.numpy()))
        callbacks.on_train_batch_end(step)
    callbacks.on_train_end()

    logged = read_tags(str(tmp_path))
    assert monitor.layer_paths == ["hidden", "out"]
    assert sorted(logged[tags.GLOBAL]) == list(range(1, STEPS + 1))
    for step, (global_norm, per_layer) in enumerate(expected, start=1):
        np.testing.assert_allclose(logged[tags.GLOBAL][step], global_norm, rtol=RTOL)
        np.testing.assert_allclose([logged["grad_norm/hidden"][step], logged["grad_norm/out"][step]],
                                   per_layer, rtol=RTOL)
    assert not hasattr(optimizer, "_gradwatch_capture") or optimizer._gradwatch_capture is None


def test_custom_loop_traced_before_on_train_begin_warns_and_records_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model, optimizer = make_loop_model(), keras.optimizers.SGD(0.01)
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=1, optimizers=[optimizer], verbose=0)
    callbacks = keras.callbacks.CallbackList([monitor], model=model)
    train_step = make_step(model, optimizer, False)
    x, y = loop_data()
    train_step(x[0], y[0])  # traced here, before gradwatch hooks the optimizer
    callbacks.on_train_begin()
    for step in range(1, 3):
        train_step(x[step], y[step])
        callbacks.on_train_batch_end(step)
    callbacks.on_train_end()
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert len(warnings) == 1
    assert "traced before gradwatch was attached" in warnings[0] and "'sgd'" in warnings[0].lower()  # Keras 3.8 names it 'SGD'
    assert "went from 1 to 2" in warnings[0]  # seen at the first drain
    assert not (tmp_path / "train").exists()  # nothing is recorded that was not seen


def test_named_optimizer_that_never_applies_gradients_warns(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model, optimizer, idle = make_loop_model(), keras.optimizers.SGD(0.01), keras.optimizers.SGD(0.01)
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0,
                                        optimizers={"main": optimizer, "idle": idle})
    callbacks = keras.callbacks.CallbackList([monitor], model=model)
    callbacks.on_train_begin()
    train_step = make_step(model, optimizer, False)
    x, y = loop_data()
    for step in range(3):
        train_step(x[step], y[step])
        callbacks.on_train_batch_end(step)
    callbacks.on_train_end()
    warnings = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert warnings == ["GradientMonitor: the optimizer 'idle' given in `optimizers` never applied gradients "
                        "in the monitored steps: nothing was recorded for it."]
    assert sorted(os.listdir(tmp_path / "train")) == ["main"]
    assert sorted(read_tags(str(tmp_path), run="train/main")[tags.GLOBAL]) == [1, 2, 3]


@pytest.mark.parametrize("value, message", [
    ("adam", "must be None, a list"),
    ([], "an empty collection"),
    ([object()], "a non-optimizer"),
    ({"../up": None}, "whose names are letters"),
    ({"": keras.optimizers.SGD()}, "whose names are letters"),
])
def test_optimizers_argument_is_checked(value, message):
    with pytest.raises(ValueError, match=message) as raised:
        gradwatch.GradientMonitor(optimizers=value)
    assert "Received: optimizers=" in str(raised.value)


def test_optimizers_argument_rejects_the_same_optimizer_twice():
    optimizer = keras.optimizers.SGD()
    with pytest.raises(ValueError, match="same optimizer twice"):
        gradwatch.GradientMonitor(optimizers=[optimizer, optimizer])


def test_held_optimizers_names_and_dedupes():
    from gradwatch.capture.optimizers import held_optimizers

    gan = GAN()
    d_opt, g_opt = keras.optimizers.SGD(), keras.optimizers.Adam()
    gan.compile(d_optimizer=d_opt, g_optimizer=g_opt, optimizer=g_opt)
    assert held_optimizers(gan) == [("g_optimizer", g_opt), ("d_optimizer", d_opt)]
    gan.compile(d_optimizer=d_opt, g_optimizer=g_opt)  # compile()'s default RMSprop first
    names = [name for name, _ in held_optimizers(gan)]
    assert names == ["optimizer", "d_optimizer", "g_optimizer"]

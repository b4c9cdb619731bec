"""Independent references for the tests: event files read with TensorBoard's
own loader, gradients computed with `tf.GradientTape`."""

import os

import keras
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator


def read_tags(log_dir, run="train"):
    """`{tag: {step: value}}` of every series in a run: scalars (`simple_value`) and
    one-value tensors (JSON strings), not the `gradwatch/norms` blocks."""
    acc = event_accumulator.EventAccumulator(
        os.path.join(log_dir, run),
        size_guidance={event_accumulator.TENSORS: 0, event_accumulator.SCALARS: 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags()["scalars"]:
        values = {}
        for event in acc.Scalars(tag):
            assert event.step not in values, f"duplicate step {event.step} in {tag}"
            values[event.step] = float(np.float32(event.value))
        series[tag] = values
    for tag in acc.Tags()["tensors"]:
        if tag == "gradwatch/norms":  # blocks of steps (matrices), not one value per step
            continue
        values = {}
        for event in acc.Tensors(tag):
            array = tf.make_ndarray(event.tensor_proto)
            assert event.step not in values, f"duplicate step {event.step} in {tag}"
            values[event.step] = array.item() if array.dtype != object else array.item().decode()
        series[tag] = values
    return series


def tape_norms(model, x, y, loss_fn=None):
    """Per-variable gradient and global norm of one batch at the current weights."""
    loss_fn = loss_fn or keras.losses.MeanSquaredError()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
        if model.losses:
            loss = loss + tf.add_n(model.losses)
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    dense = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for v, g in zip(variables, grads)]
    return {id(v): float(tf.norm(g)) for v, g in zip(variables, dense)}, float(tf.linalg.global_norm(dense))


class WeightsBeforeEachStep(keras.callbacks.Callback):
    """Keeps a copy of the weights before every training batch."""

    def on_train_begin(self, logs=None):
        self.snapshots = []

    def on_train_batch_begin(self, batch, logs=None):
        self.snapshots.append([v.numpy().copy() for v in self.model.trainable_variables])


def batches(x, y, batch_size):
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def expected_norms_per_step(model, snapshots, x, y, batch_size, loss_fn=None):
    """Replays each step's weights and returns `[(variable norms, global norm)]`."""
    saved = [v.numpy() for v in model.trainable_variables]
    result = []
    for weights, (xb, yb) in zip(snapshots, batches(x, y, batch_size)):
        for v, w in zip(model.trainable_variables, weights):
            v.assign(w)
        result.append(tape_norms(model, xb, yb, loss_fn))
    for v, w in zip(model.trainable_variables, saved):
        v.assign(w)
    return result


def layer_norm(variable_norms, layer):
    """Norm over a layer's trainable variables (keyed by `id`)."""
    return float(np.sqrt(sum(variable_norms[id(v)] ** 2 for v in layer.trainable_variables)))


def layer_objects(model, paths):
    """The layer object of each reported path (walking nested models and layers)."""
    found = {}
    for path in paths:
        layer = model
        for name in path.split("/"):
            layer = sublayer(layer, name)
        found[path] = layer
    return found


def sublayer(layer, name):
    """The direct sublayer `name` of a model or a layer."""
    for candidate in layer._flatten_layers(include_self=False, recursive=False):
        if candidate.name == name:
            return candidate
    return layer.get_layer(name)


def assert_logged_norms_equal(logged, model, layer_paths, expected, rtol):
    """Step `k` (from 1) of `logged` holds `expected[k - 1]`: the global and
    every reported layer's norm, as `expected_norms_per_step` computed them."""
    from gradwatch import tags

    assert sorted(logged[tags.GLOBAL]) == list(range(1, len(expected) + 1))
    layers = layer_objects(model, layer_paths)
    for step, (variable_norms, global_norm) in enumerate(expected, start=1):
        np.testing.assert_allclose(logged[tags.GLOBAL][step], global_norm, rtol=rtol)
        for path, layer in layers.items():
            np.testing.assert_allclose(logged[tags.layer_tag(path)][step],
                                       layer_norm(variable_norms, layer), rtol=rtol)


def spiked_data(steps, batch_size, spike_steps, scale=1e4, nan_steps=()):
    """Regression data whose batches at `spike_steps` (from 1) have targets
    times `scale`, and whose batches at `nan_steps` hold a NaN input."""
    x, y = regression_data(n=steps * batch_size)
    for step in spike_steps:
        y[(step - 1) * batch_size:step * batch_size] *= scale
    for step in nan_steps:
        x[(step - 1) * batch_size, 0] = np.nan
    return x, y


def regression_data(n=64, features=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x @ rng.normal(size=(features, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def two_cpu_strategy():
    """MirroredStrategy over the two logical CPUs set up in conftest.

    Reduction to one device rather than TensorFlow's default collective
    all-reduce: collective instances of successive strategies in one process
    clash on CPU ("Shape mismatch in the collective instance"), with or
    without gradwatch. The all-reduced value is the same either way.
    """
    import pytest

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices (set in conftest)")
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())

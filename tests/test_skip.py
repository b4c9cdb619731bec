"""A non-finite step skipped: for every Keras optimizer the skipped step leaves every weight and
slot bit for bit (AdamW's weight decay and Nadam's `_u_product`, written by Keras before the
gradient reaches gradwatch, included: `gradwatch.capture.skip`), and the steps before it are bit for
bit those of plain Keras."""

import keras
import numpy as np
import pytest

import gradwatch

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)

STEPS, NAN_STEP, BATCH = 5, 3, 8


def model():
    tokens = keras.Input((3,), dtype="int32", name="tokens")
    features = keras.Input((4,), name="features")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(20, 4, name="embed")(tokens))  # sparse gradient
    hidden = keras.layers.Dense(8, activation="tanh", name="hidden")(keras.layers.Concatenate()([embedded, features]))
    return keras.Model([tokens, features], keras.layers.Dense(1, name="out")(hidden))


def data(nan):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=(STEPS * BATCH, 3)).astype("int32")
    features = rng.normal(size=(STEPS * BATCH, 4)).astype("float32")
    y = rng.normal(size=(STEPS * BATCH, 1)).astype("float32")
    if nan:
        features[(NAN_STEP - 1) * BATCH, 0] = np.nan
    return [tokens, features], y


class States(keras.callbacks.Callback):
    """Every weight and optimizer slot (not the step counter) after each step."""

    def on_train_begin(self, logs=None):
        self.after = []

    def on_train_batch_end(self, batch, logs=None):
        variables = self.model.trainable_variables + [
            v for v in self.model.optimizer.variables if "iteration" not in v.path]
        self.after.append([np.array(v.numpy(), copy=True) for v in variables])


def train(optimizer, nan, monitor=None):
    keras.utils.set_random_seed(1)
    net = model()
    net.compile(optimizer=optimizer, loss="mse")
    states = States()
    x, y = data(nan)
    net.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
            callbacks=[states] + ([monitor] if monitor else []))
    return states.after


# Every optimizer of Keras 3 that takes a learning rate alone (those of this Keras version).
OPTIMIZERS = [name for name in ("SGD", "Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Adagrad", "Adadelta",
                                "Adafactor", "Ftrl", "Lion", "Lamb", "Muon", "ScheduleFreeAdamW")
              if hasattr(keras.optimizers, name)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_skipped_step_leaves_every_weight_and_slot_and_no_healthy_bit_changes(name, tmp_path):
    def optimizer():
        return getattr(keras.optimizers, name)(learning_rate=0.01)

    monitor = gradwatch.GradientMonitor(str(tmp_path), skip_nonfinite=True, verbose=0)
    watched = train(optimizer(), nan=True, monitor=monitor)
    plain = train(optimizer(), nan=False)
    for step in range(NAN_STEP - 1):  # the healthy steps before it: Keras' own update, bit for bit
        for ours, theirs in zip(watched[step], plain[step]):
            np.testing.assert_array_equal(ours, theirs)
    for before, after in zip(watched[NAN_STEP - 2], watched[NAN_STEP - 1]):  # the NaN step: nothing written
        np.testing.assert_array_equal(before, after)
    assert all(np.isfinite(a).all() for a in watched[-1])
    assert any(not np.array_equal(a, b) for a, b in zip(watched[NAN_STEP - 1], watched[NAN_STEP]))  # trains on
    assert [(e.step, e.action) for e in monitor.explosions] == [(NAN_STEP, "skipped")]


def test_doctests():
    import doctest

    from gradwatch.capture import skip

    assert doctest.testmod(skip, raise_on_error=False).attempted > 0
    assert doctest.testmod(skip, raise_on_error=False).failed == 0

"""A monitor across fits, and a model after monitoring: nothing left behind."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import gradwatch
from gradwatch import tags
from helpers import read_tags, regression_data

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)


def mlp():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                             keras.layers.Dense(1, name="out")])


def test_second_fit_continues_the_step_count(tmp_path):
    x, y = regression_data(n=48)
    model = mlp()
    model.compile(optimizer="adam", loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    logged = read_tags(str(tmp_path))  # fails on a duplicate step
    assert sorted(logged[tags.GLOBAL]) == list(range(1, 10))
    assert int(model.optimizer.iterations) == 9


def test_new_monitor_on_trained_model_hooks_once(tmp_path):
    x, y = regression_data(n=48)
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # traced without gradwatch
    first = gradwatch.GradientMonitor(str(tmp_path / "a"), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[first])
    second = gradwatch.GradientMonitor(str(tmp_path / "b"), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[second])
    assert sorted(read_tags(str(tmp_path / "a"))[tags.GLOBAL]) == [4, 5, 6]
    assert sorted(read_tags(str(tmp_path / "b"))[tags.GLOBAL]) == [7, 8, 9]
    assert "_gradwatch_capture" not in vars(model.optimizer)


def test_after_monitoring_the_model_is_untouched(tmp_path):
    x, y = regression_data(n=48)
    model = mlp()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    config_before = model.optimizer.get_config()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[gradwatch.GradientMonitor(str(tmp_path / "logs"), verbose=0)])
    assert model.optimizer.get_config() == config_before
    assert not [k for k in vars(model.optimizer) if "gradwatch" in k or k in (
        "_all_reduce_sum_gradients", "_clip_gradients", "_backend_update_step")]
    model.evaluate(x, y, verbose=0)
    predictions = model.predict(x, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    # Loads in a process where gradwatch was never imported.
    code = ("import sys, numpy as np, keras; m = keras.models.load_model(sys.argv[1]); "
            "import json; print(json.dumps({'gw': 'gradwatch' in sys.modules, "
            "'pred': m.predict(np.load(sys.argv[2]), verbose=0).tolist()}))")
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "x.npy")],
                         capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["gw"] is False
    np.testing.assert_allclose(loaded["pred"], predictions, rtol=1e-6)


def test_weights_keep_training_without_gradwatch_after_fit(tmp_path):
    x, y = regression_data(n=32)
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # retraced without the hook
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == [1, 2]


def test_a_reused_monitor_does_not_retrace_and_keeps_its_detector(tmp_path):
    x, y = regression_data(n=16 * 60)
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    functions = []

    class SeeTrainFunction(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                functions.append(self.model.train_function)

    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor, SeeTrainFunction()])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[monitor, SeeTrainFunction()])
    assert functions[0] is functions[1]  # traced once, reused
    thresholds = read_tags(str(tmp_path))[tags.THRESHOLD]
    assert 61 in thresholds  # first step of the second fit: the detector's baseline carried over
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[SeeTrainFunction()])
    assert functions[2] is not functions[1]  # without gradwatch: the plain function
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, 121))


def test_same_run_and_steps_as_keras_tensorboard_callback(tmp_path):
    x, y = regression_data(n=64)
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    callbacks = [keras.callbacks.TensorBoard(str(tmp_path), update_freq=1),
                 gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0)]
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
    logged = read_tags(str(tmp_path), run="train")  # one run holds both
    assert sorted(logged["batch_loss"]) == sorted(logged[tags.GLOBAL]) == list(range(1, 9))


def test_callbacks_and_history_never_see_the_step_record(tmp_path):
    x, y = regression_data(n=64)
    model = mlp()
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    seen = []

    class SeeLogs(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(sorted(logs))

    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[
        SeeLogs(), gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0), SeeLogs()])
    assert seen == [["loss", "mae"]] * 16
    assert sorted(history.history) == ["loss", "mae"]
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, 9))


def test_a_train_step_set_on_the_instance_is_kept(tmp_path):
    x, y = regression_data(n=32)
    model = mlp()
    model.compile(optimizer="sgd", loss="mse")
    calls = []

    def train_step(data):
        calls.append(1)
        return keras.Sequential.train_step(model, data)

    model.train_step = train_step  # an instance attribute, not a method
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0)])
    assert model.train_step is train_step and calls  # traced through it, and still there
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == [1, 2]

"""Supported versions: declared in pyproject.toml, pinned in .ci/oldest.txt, and
checked when a `GradientMonitor` starts training (`gradwatch.versions`).

Unsupported versions are simulated by monkeypatching the version strings and
the optimizer classes; the real old versions were tried by hand (README,
"Compatibility")."""

import doctest
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow.optimizer import TFOptimizer
from keras.src.optimizers.base_optimizer import BaseOptimizer

import gradwatch
from gradwatch import versions
from helpers import regression_data

pytestmark = pytest.mark.core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_doctest():
    assert doctest.testmod(versions, raise_on_error=False).failed == 0


def test_error_is_exported():
    assert gradwatch.UnsupportedVersionError is versions.UnsupportedVersionError
    assert issubclass(gradwatch.UnsupportedVersionError, RuntimeError)
    assert "UnsupportedVersionError" in gradwatch.__all__


# -- declared floors agree with the check and with CI's oldest combination ----
def _floor(requirements, name):
    """The `>=` floor of `name` in a list of requirement strings, as a tuple."""
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([\d.]+)", requirement.strip())
        if match:
            return tuple(int(p) for p in match.group(1).split("."))
    raise AssertionError(f"no {name}>=... in {requirements}")


def _pins():
    with open(os.path.join(ROOT, ".ci", "oldest.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return dict(line.split("==") for line in lines if "==" in line)


def test_pyproject_declares_the_floors_the_check_enforces():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    dependencies = project["dependencies"]
    assert _floor(dependencies, "keras") == versions.KERAS_FLOOR == (3, 8)
    assert _floor(dependencies, "tensorflow") == versions.TENSORFLOW_FLOOR
    assert _floor(project["optional-dependencies"]["tf-keras"], "tf_keras") == versions.TF_KERAS_FLOOR
    assert _floor(project["optional-dependencies"]["test"], "tf_keras") == versions.TF_KERAS_FLOOR


def test_oldest_pins_are_the_floors_and_the_tested_oldest():
    pins = _pins()
    assert versions.parse_version(pins["keras"])[:2] == versions.KERAS_FLOOR
    assert versions.parse_version(pins["tensorflow"])[:2] == versions.TENSORFLOW_FLOOR
    assert versions.parse_version(pins["tf_keras"])[:2] == versions.TF_KERAS_FLOOR
    assert (pins["tensorflow"], pins["keras"], pins["tf_keras"]) == tuple(
        versions.TESTED[name][0] for name in ("TensorFlow", "Keras", "tf_keras"))


# -- Keras 3: refused from fit(), before the first step ------------------------
def _model(optimizer=None):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=optimizer or keras.optimizers.Adam(0.01), loss="mse")
    return model


def _nan_data():
    x, y = regression_data(n=64)
    x[16, 0] = np.nan  # the second batch of 16
    return x, y


def _fit_refused(tmp_path, model=None):
    """Fits with an auto-clipping monitor; returns the error's message after
    checking nothing was trained, hooked or written."""
    model = model or _model()
    weights = [v.numpy().copy() for v in model.weights]
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", verbose=0)
    x, y = _nan_data()
    with pytest.raises(gradwatch.UnsupportedVersionError) as caught:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    assert int(optimizer.iterations.numpy()) == 0
    assert getattr(optimizer, "_gradwatch_capture", None) is None
    assert not [name for name in vars(optimizer) if name.startswith(("_clip_gradients", "_all_reduce",
                                                                       "_backend_update", "_distributed"))]
    assert not os.path.exists(os.path.join(tmp_path, "train"))
    assert monitor.explosions == []
    return str(caught.value)


@pytest.mark.parametrize("version, piece", [
    ("3.0.0", "the optimizer method `_all_reduce_sum_gradients` (the cross-replica sum"),
    ("3.1.1", "the optimizer method `_all_reduce_sum_gradients` (the cross-replica sum"),
    ("3.2.1", "Keras 3.2-3.4 call it inside `_distributed_tf_update_step`"),
    ("3.4.1", "Keras 3.2-3.4 call it inside `_distributed_tf_update_step`"),
    ("3.5.0", "`scale_loss_for_distribution`, Keras 3.8"),
    ("3.7.0", "`scale_loss_for_distribution`, Keras 3.8"),
    ("2.15.0", "Keras 3 (this is Keras 2: use it through tf_keras instead)"),
])
def test_keras_below_the_floor_is_refused_before_the_first_step(version, piece, tmp_path, monkeypatch):
    monkeypatch.setattr(keras, "__version__", version)
    message = _fit_refused(tmp_path)
    assert message.startswith(f"gradwatch does not support Keras {version}: it needs ")
    assert piece in message
    assert "Supported: Keras >= 3.8 (tested: 3.8.0 and 3.15.1) with TensorFlow >= 2.16." in message
    assert 'pip install "keras>=3.8"' in message


def test_supported_keras_versions_pass(tmp_path, monkeypatch):
    for version in ("3.8.0", "3.10.0.dev2025010203", "4.0.0"):
        monkeypatch.setattr(keras, "__version__", version)
        versions.check(_model())


def test_after_a_refusal_the_same_monitor_trains_on_a_supported_version(tmp_path, monkeypatch):
    model = _model()
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", verbose=0)
    x, y = _nan_data()
    with monkeypatch.context() as patch:
        patch.setattr(keras, "__version__", "3.4.1")
        with pytest.raises(gradwatch.UnsupportedVersionError):
            model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    assert [(e.step, e.action) for e in monitor.explosions] == [(2, "skipped")]
    assert int(model.optimizer.iterations.numpy()) == 4
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


def test_missing_method_is_refused(tmp_path, monkeypatch):
    monkeypatch.delattr(TFOptimizer, "_all_reduce_sum_gradients")
    message = _fit_refused(tmp_path)
    assert message.startswith(f"gradwatch does not support Keras {keras.__version__}: it needs ")
    assert "the optimizer method `Adam._all_reduce_sum_gradients` (missing)" in message
    assert "Keras >= 3.8" in message


def test_every_missing_piece_is_named_once(tmp_path, monkeypatch):
    monkeypatch.delattr(TFOptimizer, "_all_reduce_sum_gradients")
    monkeypatch.delattr(BaseOptimizer, "_clip_gradients")
    message = _fit_refused(tmp_path)
    assert ("it needs the optimizer method `Adam._all_reduce_sum_gradients` (missing); and the optimizer "
            "method `Adam._clip_gradients` (missing). Supported:") in message


def test_below_the_floor_only_the_known_reason_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.1.1")
    monkeypatch.delattr(TFOptimizer, "_all_reduce_sum_gradients")  # as in Keras 3.1
    message = _fit_refused(tmp_path)
    assert message.count("_all_reduce_sum_gradients") == 1
    assert "added in Keras 3.2" in message


def test_changed_signature_is_refused(tmp_path, monkeypatch):
    original = TFOptimizer._distributed_tf_update_step

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate, *, extra):
        return original(self, distribution, grads_and_vars, learning_rate)

    monkeypatch.setattr(TFOptimizer, "_distributed_tf_update_step", _distributed_tf_update_step)
    message = _fit_refused(tmp_path)
    assert (f"gradwatch does not support Keras {keras.__version__}: it needs the optimizer method "
            "`Adam._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)` "
            "(found `_distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate, *, "
            "extra)`)") in message


def test_clip_gradients_with_a_new_required_argument_is_refused(tmp_path, monkeypatch):
    def _clip_gradients(self, grads, variables):
        return grads

    monkeypatch.setattr(keras.optimizers.Optimizer, "_clip_gradients", _clip_gradients)
    message = _fit_refused(tmp_path)
    assert "`Adam._clip_gradients(grads)` (found `_clip_gradients(self, grads, variables)`)" in message


# Keras 3.4's order, as a future Keras might bring it back: the sum inside the update.
def _update_step_3_4(self, grads, trainable_variables, learning_rate):
    grads_and_vars = list(zip(grads, trainable_variables))
    tf.__internal__.distribute.interim.maybe_merge_call(
        self._distributed_tf_update_step, self._distribution_strategy, grads_and_vars, learning_rate)


def _distributed_update_3_4(self, distribution, grads_and_vars, learning_rate):
    grads_and_vars = self._all_reduce_sum_gradients(grads_and_vars)
    for grad, var in grads_and_vars:
        distribution.extended.update(var, self.update_step, args=(grad, learning_rate), group=False)


def test_all_reduce_inside_the_update_is_refused_whatever_the_version(tmp_path, monkeypatch):
    monkeypatch.setattr(TFOptimizer, "_backend_update_step", _update_step_3_4)
    monkeypatch.setattr(TFOptimizer, "_distributed_tf_update_step", _distributed_update_3_4)
    message = _fit_refused(tmp_path)
    assert message.startswith(f"gradwatch does not support Keras {keras.__version__}: it needs "
                              "`_all_reduce_sum_gradients` called from `_backend_update_step`")
    assert "Keras >= 3.8" in message


class _ChangedSGD(keras.optimizers.SGD):
    def _clip_gradients(self, grads, variables):  # as a future Keras might
        return grads


def test_every_watched_optimizer_is_checked(tmp_path):
    model = _model()
    model.second_optimizer = _ChangedSGD(0.01)  # held by the model: watched too (`optimizers=None`)
    message = _fit_refused(tmp_path, model)
    assert ("it needs the optimizer method `_ChangedSGD._clip_gradients(grads)` (found "
            "`_clip_gradients(self, grads, variables)`). Supported:") in message
    assert "Adam" not in message
    versions.check(model, [model.optimizer])  # the first one alone is fine


def test_subclass_update_step_calling_super_passes():
    # Nadam overrides `_backend_update_step` and calls super(): the order is read on Keras' class.
    assert "_backend_update_step" in vars(keras.optimizers.Nadam)
    versions.check(_model(keras.optimizers.Nadam(0.01)))


def test_tensorflow_below_the_floor_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tf, "__version__", "2.15.1")
    message = _fit_refused(tmp_path)
    assert message.startswith("gradwatch does not support TensorFlow 2.15.1: it needs TensorFlow 2.16 or newer.")
    assert "Supported: TensorFlow >= 2.16 (tested: 2.16.1 and 2.21.0)." in message


def test_loss_scale_optimizer_method_is_checked(tmp_path, monkeypatch):
    keras.config.set_dtype_policy("mixed_float16")
    model = _model(keras.optimizers.SGD(0.01))
    keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    versions.check(model)  # as installed: fine
    monkeypatch.delattr(keras.optimizers.LossScaleOptimizer, "_stateful_handle_non_finite_grads")
    message = _fit_refused(tmp_path, model)
    assert "the optimizer method `LossScaleOptimizer._stateful_handle_non_finite_grads` (missing)" in message


# -- tf_keras -----------------------------------------------------------------
@pytest.fixture
def tf_keras():
    return pytest.importorskip("tf_keras", reason="tf_keras is not installed")


def _tf_keras_model(tf_keras, optimizer=None):
    tf_keras.backend.clear_session()
    model = tf_keras.Sequential([tf_keras.Input((8,)), tf_keras.layers.Dense(4, name="hidden"),
                                 tf_keras.layers.Dense(1, name="out")])
    model.compile(optimizer=optimizer or tf_keras.optimizers.Adam(0.01), loss="mse")
    return model


def _tf_keras_fit_refused(tmp_path, model):
    weights = [v.numpy().copy() for v in model.weights]
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", verbose=0)
    x, y = _nan_data()
    with pytest.raises(gradwatch.UnsupportedVersionError) as caught:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert int(model.optimizer.iterations.numpy()) == 0
    assert getattr(model.optimizer, "_gradwatch_capture", None) is None
    assert not os.path.exists(os.path.join(tmp_path, "train"))
    return str(caught.value)


def test_tf_keras_below_the_floor_is_refused(tf_keras, tmp_path, monkeypatch):
    monkeypatch.setattr(tf_keras, "__version__", "2.15.1")
    message = _tf_keras_fit_refused(tmp_path, _tf_keras_model(tf_keras))
    assert message.startswith("gradwatch does not support tf_keras 2.15.1: it needs tf_keras 2.16 or newer.")
    assert "Supported: tf_keras >= 2.16 (tested: 2.16.0 and 2.21.0) with TensorFlow >= 2.16." in message
    assert 'pip install "tf_keras>=2.16"' in message


def test_tf_keras_changed_update_step_is_refused(tf_keras, tmp_path, monkeypatch):
    def _update_step(self, gradient, variable, learning_rate):
        pass

    monkeypatch.setattr(tf_keras.optimizers.Optimizer, "_update_step", _update_step)
    message = _tf_keras_fit_refused(tmp_path, _tf_keras_model(tf_keras))
    assert message.startswith(f"gradwatch does not support tf_keras {tf_keras.__version__}: it needs ")
    assert ("`Adam._update_step(gradient, variable)` (found `_update_step(self, gradient, variable, "
            "learning_rate)`)") in message


def test_tf_keras_legacy_missing_method_is_refused(tf_keras, tmp_path, monkeypatch):
    model = _tf_keras_model(tf_keras, tf_keras.optimizers.legacy.SGD(0.01))
    versions.check(model)  # as installed: fine
    monkeypatch.delattr(tf_keras.optimizers.legacy.Optimizer, "_transform_gradients")
    message = _tf_keras_fit_refused(tmp_path, model)
    assert "the optimizer method `SGD._transform_gradients` (missing)" in message


def test_tf_keras_installed_optimizers_pass(tf_keras):
    for optimizer in (tf_keras.optimizers.SGD(0.01, momentum=0.9), tf_keras.optimizers.AdamW(0.01),
                      tf_keras.optimizers.legacy.Adam(0.01)):
        versions.check(_tf_keras_model(tf_keras, optimizer))
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _tf_keras_model(tf_keras, tf_keras.optimizers.SGD(0.01))
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert getattr(model.optimizer, "_loss_scale", None) is not None
    versions.check(model)

"""Keras 3 on another backend than TensorFlow: `GradientMonitor(...)` and
`ClippingSweep(...)` raise `gradwatch.UnsupportedBackendError` when constructed,
naming the backend and the fix; the version check never blames the version for
it; `gradwatch report` and the dashboard read logs on any backend.

In this process (TensorFlow) the backend is simulated by monkeypatching
`keras.backend.backend` (core tests). On the real JAX and PyTorch backends, a
child process (`backend_process.py`, `KERAS_BACKEND=jax` / `torch`) does what a
new user would, on a log folder written here on TensorFlow; skipped when jax /
torch is not installed."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import keras
import numpy as np
import pytest

import gradwatch
from gradwatch import cli, versions

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = "KERAS_BACKEND=tensorflow before Keras is first imported"


def _model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="out")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


@pytest.fixture
def on_jax(monkeypatch):
    """This Keras reports the "jax" backend, chosen by `KERAS_BACKEND=jax`."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setenv("KERAS_BACKEND", "jax")


@pytest.fixture
def no_tf_keras(monkeypatch):
    """tf_keras not imported, as for a new user of Keras 3 (other tests may have imported it)."""
    monkeypatch.delitem(sys.modules, "tf_keras", raising=False)


# -- simulated backend, in this process (core) ---------------------------------
@pytest.mark.core
def test_error_is_exported_and_documented():
    assert gradwatch.UnsupportedBackendError is versions.UnsupportedBackendError
    assert "UnsupportedBackendError" in gradwatch.__all__
    assert issubclass(gradwatch.UnsupportedBackendError, RuntimeError)
    assert not issubclass(gradwatch.UnsupportedBackendError, gradwatch.UnsupportedVersionError)
    assert "KERAS_BACKEND=tensorflow" in gradwatch.UnsupportedBackendError.__doc__
    for error in (gradwatch.UnsupportedBackendError, gradwatch.UnsupportedVersionError):
        assert f"{error.__module__}.{error.__qualname__}" == f"gradwatch.{error.__name__}"  # tracebacks
        assert pickle.loads(pickle.dumps(error("message"))).args == ("message",)
    assert "UnsupportedBackendError" in gradwatch.GradientMonitor.__doc__
    assert "UnsupportedBackendError" in gradwatch.ClippingSweep.__doc__


@pytest.mark.core
def test_construction_is_refused_naming_the_backend_and_the_fix(on_jax, no_tf_keras, tmp_path):
    model = _model()
    started = []
    flag = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: started.append(True))
    with pytest.raises(gradwatch.UnsupportedBackendError) as caught:
        model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0,
                  callbacks=[flag, gradwatch.GradientMonitor(str(tmp_path / "logs"))])
    message = str(caught.value)
    assert message.startswith("gradwatch needs Keras' TensorFlow backend; this Keras runs on the \"jax\" "
                              "backend (keras.backend.backend() == \"jax\", set by the environment "
                              "variable KERAS_BACKEND=jax). ")
    assert FIX in message
    assert "version" not in message.lower()
    assert not started and not os.path.exists(tmp_path / "logs")
    # Before the arguments: the backend is the problem a user must fix first.
    with pytest.raises(gradwatch.UnsupportedBackendError):
        gradwatch.GradientMonitor(str(tmp_path / "logs"), update_freq=-1)
    with pytest.raises(gradwatch.UnsupportedBackendError, match='"jax" backend') as caught:
        gradwatch.ClippingSweep(_model, log_dir=str(tmp_path / "sweep"), modes=["nope"])
    assert str(caught.value) == message
    assert not os.path.exists(tmp_path / "sweep")


@pytest.mark.core
def test_backend_from_keras_json_is_named_with_its_file(no_tf_keras, monkeypatch, tmp_path):
    from keras.src.backend import config

    (tmp_path / "keras.json").write_text(json.dumps({"backend": "torch"}))
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))  # what `keras_home()` returns
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    with pytest.raises(gradwatch.UnsupportedBackendError) as caught:
        gradwatch.GradientMonitor(str(tmp_path / "logs"))
    path = str(tmp_path / "keras.json")
    assert f'(keras.backend.backend() == "torch", set by "backend": "torch" in {path})' in str(caught.value)
    assert f'it takes precedence over {path}, or set "backend": "tensorflow" there.' in str(caught.value)


@pytest.mark.core
def test_version_check_names_the_backend_not_the_version(tmp_path, monkeypatch):
    model = _model()
    monitor = gradwatch.GradientMonitor(str(tmp_path / "logs"), verbose=0)  # on TensorFlow: fine
    monkeypatch.setattr(keras, "__version__", "3.4.1")  # an old Keras too: the backend is named first
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(gradwatch.UnsupportedBackendError, match='"jax" backend'):
        versions.check(model)
    with pytest.raises(gradwatch.UnsupportedBackendError, match='"jax" backend'):  # the backstop in fit()
        model.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0, callbacks=[monitor])
    assert int(model.optimizer.iterations.numpy()) == 0
    assert not os.path.exists(tmp_path / "logs")


@pytest.mark.core
def test_tf_keras_model_is_not_refused(on_jax, tmp_path):
    """tf_keras always runs on TensorFlow, whatever Keras 3's backend."""
    tf_keras = pytest.importorskip("tf_keras", reason="tf_keras is not installed")
    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(1, name="out")])
    model.compile(tf_keras.optimizers.SGD(0.01), "mse")
    versions.check(model)
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)  # tf_keras imported: allowed
    model.fit(np.ones((8, 4)), np.ones((8, 1)), batch_size=4, verbose=0, callbacks=[monitor])
    assert os.listdir(tmp_path / "train")
    with pytest.raises(gradwatch.UnsupportedBackendError):  # a Keras 3 model still is refused
        versions.check(_model())


@pytest.mark.core
def test_demo_command_says_so_in_one_line(on_jax, tmp_path, capsys):
    assert cli.main(["demo", "--logdir", str(tmp_path / "demo")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("gradwatch: error: gradwatch needs Keras' TensorFlow backend; this Keras runs on "
                          "the \"jax\" backend") and FIX in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "demo")


# -- the real JAX / PyTorch backends, in a child process -----------------------
@pytest.fixture(scope="module")
def tensorflow_logdir(tmp_path_factory):
    """A log folder written by `GradientMonitor` on the TensorFlow backend (2 steps)."""
    logdir = str(tmp_path_factory.mktemp("tf_logs"))
    keras.utils.set_random_seed(0)
    model = _model()
    model.fit(np.ones((8, 4)), np.ones((8, 1)), batch_size=4, verbose=0,
              callbacks=[gradwatch.GradientMonitor(logdir, verbose=0)])
    return logdir


def _pythonpath():
    """This process' gradwatch and dashboard plugin first, for the child."""
    import tensorboard_plugin_gradwatch

    roots = [os.path.dirname(os.path.dirname(module.__file__))
             for module in (gradwatch, tensorboard_plugin_gradwatch)]
    return os.pathsep.join(dict.fromkeys(roots + [p for p in [os.environ.get("PYTHONPATH")] if p]))


BACKENDS = {
    "jax": "pip install jax (in the test extra)",
    "torch": "pip install torch==2.13.0, a CPU wheel (not in the test extra: a plain "
             "`pip install torch` downloads a multi-GB CUDA build)",
}


@pytest.fixture(scope="module")
def children(request, tensorflow_logdir, tmp_path_factory):
    """`{backend: child process}` for the installed backends whose test is selected,
    started together (each spends its seconds importing TensorFlow, Keras and the backend)."""
    selected = {item.callspec.params["backend"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_on_a_real_backend"}
    started = {}
    for backend in BACKENDS:
        if backend not in selected or importlib.util.find_spec(backend) is None:
            continue
        workdir = tmp_path_factory.mktemp(f"on_{backend}")
        env = dict(os.environ, KERAS_BACKEND=backend, KERAS_HOME=str(workdir / "keras_home"),
                   PYTHONPATH=_pythonpath(), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        started[backend] = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "backend_process.py"), backend, tensorflow_logdir,
             str(workdir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield started
    for child in started.values():
        if child.poll() is None:
            child.kill()
            child.communicate()


# `children` starts every selected backend's process at once: both cases on one pytest-xdist
# worker (`--dist loadgroup`, pyproject.toml), else each worker would start them all.
@pytest.mark.xdist_group("test_backends.children")
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_on_a_real_backend(backend, children):
    if backend not in children:
        pytest.skip(f"{backend} is not installed: {BACKENDS[backend]}")
    stdout, stderr = children[backend].communicate(timeout=300)
    assert children[backend].returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    for constructed in ("monitor", "sweep"):  # at construction, before fit() / search()
        error = result[constructed]
        assert error["type"] == "UnsupportedBackendError", error
        assert error["message"].startswith(
            f"gradwatch needs Keras' TensorFlow backend; this Keras runs on the \"{backend}\" backend "
            f"(keras.backend.backend() == \"{backend}\", set by the environment variable "
            f"KERAS_BACKEND={backend}). ")
        assert FIX in error["message"]
    assert not result["fit_started"] and result["written"] == []
    assert result["check"]["type"] == "UnsupportedBackendError"
    report = result["report"]
    assert report["status"] == 0, report
    assert "train  1..2 (2)" in report["stdout"] and report["stderr"] == ""
    assert [run["name"] for run in result["dashboard"]] == ["train"]

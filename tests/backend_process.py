"""A new user's first contact on another Keras backend, in a child process
(`tests/test_backends.py`): `python backend_process.py BACKEND LOGDIR WORKDIR`
with `KERAS_BACKEND=BACKEND` set. LOGDIR holds a run written on TensorFlow.

Prints one JSON line (the last) with what happened:
- "backend": `keras.backend.backend()`;
- "monitor", "sweep": the error type and message of `GradientMonitor(...)` and
  `ClippingSweep(...)`, constructed as a user would, inside `model.fit(...)`'s
  argument list and before `search`;
- "fit_started": whether a callback's `on_train_begin` ran; "written": files
  under WORKDIR's log folders;
- "check": what `gradwatch.versions.check(model)` raised for the Keras model;
- "report": exit status and output of `gradwatch report LOGDIR` run in this
  process (Keras already imported on BACKEND);
- "dashboard": the gradwatch runs TensorBoard's plugin lists for LOGDIR.
"""

import contextlib
import io
import json
import os
import sys


def _error(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 -- reported to the test
        return {"type": type(error).__name__, "message": str(error)}
    return None


def _dashboard_runs(logdir):
    from tensorboard import program
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester
    from tensorboard.plugins.core import core_plugin
    from werkzeug.test import Client

    from tensorboard_plugin_gradwatch import plugin

    board = program.TensorBoard(plugins=[core_plugin.CorePluginLoader(), plugin.GradwatchPluginLoader])
    board.configure(["tensorboard", "--logdir", logdir, "--reload_interval", "0",
                     "--reload_task", "blocking", "--load_fast", "false"])
    ingester = data_ingester.LocalDataIngester(board.flags)
    ingester.start()
    app = application.TensorBoardWSGIApp(board.flags, board.plugin_loaders, ingester.data_provider,
                                         board.assets_zip_provider, ingester.deprecated_multiplexer)
    response = Client(app).get("/data/plugin/gradwatch/runs")
    return json.loads(response.get_data(as_text=True))["runs"]


def main(backend, logdir, workdir):
    import keras
    import numpy as np

    import gradwatch
    from gradwatch import cli, versions

    result = {"backend": keras.backend.backend()}
    assert result["backend"] == backend, result

    def build_model():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="out")])
        model.compile(keras.optimizers.SGD(0.01), "mse")
        return model

    started = []

    class FitStarted(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            started.append(True)

    model = build_model()
    x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
    monitor_logs = os.path.join(workdir, "monitor_logs")
    result["monitor"] = _error(lambda: model.fit(
        x, y, epochs=1, verbose=0, callbacks=[FitStarted(), gradwatch.GradientMonitor(monitor_logs)]))
    result["fit_started"] = bool(started)
    sweep_logs = os.path.join(workdir, "sweep_logs")
    result["sweep"] = _error(lambda: gradwatch.ClippingSweep(build_model, log_dir=sweep_logs).search(
        x, y, epochs=1, validation_data=(x, y)))
    result["written"] = [path for path in (monitor_logs, sweep_logs) if os.path.exists(path)]
    result["check"] = _error(lambda: versions.check(model))

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["report", logdir])
    result["report"] = {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}
    result["dashboard"] = _dashboard_runs(logdir)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])

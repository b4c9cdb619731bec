"""tf_keras + MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Checks that the chief logs the norms of the globally all-reduced gradient (the
gradient of the global batch, replayed here on the weights each step started
from), that only one set of summaries is written, that only the chief logs
alerts, and that an injected spike switches clipping on at the same step on
both workers (their final weights are equal).
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from gradwatch import tags
from helpers import read_tags

pytestmark = [
    pytest.mark.core,  # also run on the oldest supported versions (.ci/run)
    # Every test reads the one module-scoped run: one pytest-xdist worker (`--dist loadgroup`).
    pytest.mark.xdist_group("test_multiworker"),
]

tf_keras = pytest.importorskip("tf_keras", reason="tf_keras is not installed")
import multiworker_worker as worker  # noqa: E402  (tests/ is on sys.path)

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiworker_worker.py")
TIMEOUT_S = 120  # whole run; it takes about 20 s here
SETTINGS = {"steps": 10, "global_batch": 32, "spike_step": 7, "scale": 1e3, "learning_rate": 0.01,
            "update_freq": 4, "explosion_threshold": 50.0, "clip_threshold": 1.0}
RTOL = 1e-5


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(tmp_path, count=2):
    ports = free_ports(count)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    settings = dict(SETTINGS, log_dir=str(tmp_path / "logs"), out_dir=str(tmp_path))
    settings_path = tmp_path / "settings.json"
    settings_path.write_text(json.dumps(settings))
    processes = []
    try:
        for index in range(count):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster,
                                                          "task": {"type": "worker", "index": index}}),
                       TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", TF_USE_LEGACY_KERAS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(WORKER_SCRIPT),
                                                                os.environ.get("PYTHONPATH")])))
            log = open(tmp_path / f"worker_{index}.log", "w")
            processes.append(subprocess.Popen([sys.executable, WORKER_SCRIPT, str(settings_path)], env=env,
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"workers did not finish in {TIMEOUT_S} s:\n{_logs(tmp_path, count)}")
    finally:
        for process in processes:  # always clean up (only the processes started here)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    codes = [p.returncode for p in processes]
    assert codes == [0] * count, f"worker exit codes {codes}:\n{_logs(tmp_path, count)}"
    reports = [json.loads((tmp_path / f"worker_{i}.json").read_text()) for i in range(count)]
    arrays = [np.load(tmp_path / f"worker_{i}.npz") for i in range(count)]
    return settings, reports, arrays


def _logs(tmp_path, count):
    return "\n".join(f"--- worker {i}:\n" + (tmp_path / f"worker_{i}.log").read_text()[-3000:]
                     for i in range(count))


def _weights(arrays, prefix, num_variables):
    return [arrays[f"{prefix}_{i}"] for i in range(num_variables)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("multiworker")
    return (tmp_path,) + run_workers(tmp_path)


def test_chief_logs_the_norms_of_the_global_batch_gradient(run):
    tmp_path, settings, reports, arrays = run
    assert [r["replicas"] for r in reports] == [2, 2]
    steps, size = settings["steps"], settings["global_batch"]
    assert [r["steps_seen"] for r in reports] == [steps, steps]
    assert [r["iterations"] for r in reports] == [steps, steps]
    logged = read_tags(settings["log_dir"])
    assert sorted(logged[tags.GLOBAL]) == list(range(1, steps + 1))
    x, y = worker.make_data(steps, size, settings["spike_step"], settings["scale"])
    model = worker.build_model(tf_keras)
    chief = arrays[0]
    loss_fn = tf_keras.losses.MeanSquaredError()
    for step in range(1, steps + 1):
        for variable, w in zip(model.trainable_variables,
                               _weights(chief, f"snap_{step - 1}", len(model.trainable_variables))):
            variable.assign(w)
        xb, yb = worker.global_batch(x, y, step, size)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        np.testing.assert_allclose(logged[tags.GLOBAL][step], float(tf.linalg.global_norm(grads)), rtol=RTOL)
        for name in ("hidden", "out"):
            layer_grads = [g for g, v in zip(grads, model.trainable_variables) if v.name.startswith(name)]
            np.testing.assert_allclose(logged[tags.layer_tag(name)][step],
                                       float(tf.linalg.global_norm(layer_grads)), rtol=RTOL)


def test_only_the_chief_writes_and_alerts(run):
    tmp_path, settings, reports, _ = run
    assert [r["chief"] for r in reports] == [True, False]
    event_files = glob.glob(os.path.join(settings["log_dir"], "**", "*tfevents*"), recursive=True)
    assert len(event_files) == 1
    assert os.path.dirname(event_files[0]) == os.path.join(settings["log_dir"], "train")
    assert os.listdir(settings["log_dir"]) == ["train"]
    assert reports[0]["scratch"] is None
    assert reports[1]["scratch"] and not os.path.exists(reports[1]["scratch"])  # removed at the end
    assert reports[0]["alerts"] and reports[1]["alerts"] == []
    assert any(f"step {settings['spike_step']}" in line for line in reports[0]["alerts"])


def test_spike_switches_clipping_on_at_the_same_step_everywhere(run):
    tmp_path, settings, reports, arrays = run
    spike, lr, threshold = settings["spike_step"], settings["learning_rate"], settings["clip_threshold"]
    for report in reports:
        assert report["explosions"][0] == spike
        assert [e["step"] for e in report["clipping_events"]] == [spike]
    assert reports[0]["clipping_events"] == reports[1]["clipping_events"]
    num_variables = 4
    finals = [_weights(a, "final", num_variables) for a in arrays]
    for w0, w1 in zip(*finals):
        np.testing.assert_array_equal(w0, w1)
    # The exploding step itself was clipped (per variable): its update is at most lr * threshold.
    before = _weights(arrays[0], f"snap_{spike - 1}", num_variables)
    after = _weights(arrays[0], f"snap_{spike}", num_variables)
    for w0, w1 in zip(before, after):
        assert np.linalg.norm(w1 - w0) <= lr * threshold * (1 + 1e-5)
    logged = read_tags(settings["log_dir"])
    assert logged[tags.GLOBAL][spike] > settings["explosion_threshold"]
    assert sorted(logged[tags.CLIP_THRESHOLD]) == list(range(spike, settings["steps"] + 1))

"""Issue 15: hostile, damaged and live logs. Every case is a fixture run served by a
real TensorBoard WSGI app (route status and size) and read by `gradwatch report`
(exit status and one-line messages)."""

import json
import os
import shutil
import threading
from urllib.parse import quote

import numpy as np
import pytest
from werkzeug.test import Client

from gradwatch import cli, tags
from gradwatch.summaries import EventWriter, _string_tensor_value, encode_event
from tensorboard_plugin_gradwatch.tests.conftest import make_app
from test_logs import only_event_file, write_run
from test_untrusted_input import append_record

PREFIX = "/data/plugin/gradwatch"
ROUTES = ("/heatmap?columns=4000", "/global?points=10000", "/alerts?limit=10000", "/ranking?limit=10000",
          "/vanishing?")
MAX_RESPONSE = 8_000_000  # bytes: the caps of the routes (views.MAX_CELLS, names cut to 512 chars)
EVIL_RUN = "evil\u202e\u009b<img src=x onerror=window.__gw_xss=1>"
WIDE = 100_000


def report(capsys, *argv):
    status = cli.main(["report", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return status, out, err


def tensor_event(step, tag, tensor):
    from tensorboard.compat.proto import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = tags.PLUGIN_NAME
    metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
    return encode_event(step, 0.0, b"\x0a" + _varint(len(value.SerializeToString())) + value.SerializeToString())


def _varint(value):
    from gradwatch.summaries import _varint as encode
    return encode(value)


def deep_json(depth):
    return '[{"step": 3, "epoch": 0, "global_norm": 1.0, "action": ' + "[" * depth + "]" * depth + "}]"


def write_hostile(root):
    """Folder name -> what it holds; each a run of its own."""
    from tensorboard.compat.proto import tensor_pb2

    write_run(root / "non_string_tensor", steps=range(1, 11))
    append_record(only_event_file(root / "non_string_tensor"),
                  tensor_event(11, tags.EXPLOSIONS, tensor_pb2.TensorProto(dtype=1, float_val=[3.0])))
    write_run(root / "empty_string_tensor", steps=range(1, 11))
    append_record(only_event_file(root / "empty_string_tensor"),
                  tensor_event(11, tags.EXPLOSIONS, tensor_pb2.TensorProto(dtype=7)))
    write_run(root / "vanishing_non_string", steps=range(1, 11))
    append_record(only_event_file(root / "vanishing_non_string"),
                  tensor_event(11, tags.VANISHING, tensor_pb2.TensorProto(dtype=7)))  # empty string tensor
    append_record(only_event_file(root / "vanishing_non_string"),
                  tensor_event(12, tags.VANISHING, tensor_pb2.TensorProto(dtype=1, float_val=[3.0])))
    write_run(root / "deep_json", steps=range(1, 11))
    for depth in (700, 900):
        for tag in (tags.EXPLOSIONS, tags.VANISHING):
            append_record(only_event_file(root / "deep_json"),
                          encode_event(10, 0.0, _string_tensor_value(tag, deep_json(depth), tags.PLUGIN_NAME)))
    wide = EventWriter(str(root / "wide"))  # ~1.3 MB declaring 100k layers, 2500 of them with norms
    layers = ["l%d" % i for i in range(WIDE)]
    wide.write_json(0, tags.LAYERS, layers)
    for step in (1, 2):
        values = {tags.layer_tag(name): 1.0 + step for name in layers[::40]}
        wide.write_scalars(step, dict(values, **{tags.GLOBAL: 3.0}))
    wide.close()
    write_run(root / "long_names", steps=range(1, 6), explode={3},
              layers=["lstm", "n" * 20_000, "x" * 1_000_000 + "tail", "embed"])
    write_run(root / EVIL_RUN, steps=range(1, 6), explode={3},
              layers=["lstm", "\u202eevil\u200f<script>window.__gw_xss=2</script>", "embed"])
    write_run(root / "truncated_tail", steps=range(1, 31))
    path = only_event_file(root / "truncated_tail")
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) - 5)
    return {"wide": WIDE}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile15")
    write_hostile(root)
    app, _ = make_app(str(root))
    return root, Client(app)


def runs_of(root):
    return sorted(name for name in os.listdir(root))


def test_every_route_of_every_run_is_200_and_bounded(hostile):
    root, client = hostile
    listed = json.loads(client.get(PREFIX + "/runs").get_data(as_text=True))["runs"]
    assert sorted(run["name"] for run in listed) == runs_of(root)
    for run in runs_of(root):
        for route in ROUTES:
            response = client.get(PREFIX + route + "&run=" + quote(run))
            assert response.status_code == 200, (run, route, response.get_data(as_text=True)[:300])
            assert len(response.get_data()) < MAX_RESPONSE, (run, route)
    response = client.get(PREFIX + "/compare?" + "&".join("run=" + quote(run) for run in runs_of(root)))
    assert response.status_code == 200 and len(response.get_data()) < MAX_RESPONSE


def get(client, route, run):
    response = client.get(PREFIX + route + "&run=" + quote(run))
    assert response.status_code == 200
    return json.loads(response.get_data(as_text=True))


def test_wide_run_heatmap_is_capped_and_says_so(hostile):
    from tensorboard_plugin_gradwatch import views

    body = get(hostile[1], "/heatmap?columns=4000", "wide")
    assert body["layers_capped"] and body["layers_total"] == WIDE
    assert len(body["layers"]) == views.MAX_ROWS and body["layers"][:2] == ["l0", "l1"]
    cells = np.frombuffer(__import__("base64").b64decode(body["cells"]), "<f4").reshape(views.MAX_ROWS, -1)
    assert cells[0].tolist() == [2.0, 3.0] and cells[1].tolist() == [-1.0, -1.0]  # l1 has no norms
    assert len(body["layers"]) * body["columns"] <= views.MAX_CELLS


def test_bad_records_are_skipped_and_the_rest_is_served(hostile):
    client = hostile[1]
    for run in ("non_string_tensor", "empty_string_tensor", "deep_json"):
        body = get(client, "/alerts?limit=100", run)
        assert body["alerts"] == [] and body["total"] == 0
        assert get(client, "/global?points=100", run)["last_step"] == 10


def test_long_names_are_cut_in_responses(hostile):
    body = get(hostile[1], "/heatmap?columns=10", "long_names")
    assert [len(name) for name in body["layers"]] == [4, 512, 512, 5]
    assert body["layers"][2].endswith("\u2026")
    alerts = get(hostile[1], "/alerts?limit=10", "long_names")
    assert [row["step"] for row in alerts["alerts"]] == [3]


def test_truncated_tail_is_served_up_to_the_cut(hostile):
    assert get(hostile[1], "/global?points=100", "truncated_tail")["last_step"] == 29


# -- gradwatch report ---------------------------------------------------------------------


@pytest.mark.parametrize("run, status, message", [
    ("non_string_tensor", 2, "holds no JSON string"),
    ("empty_string_tensor", 2, "holds no JSON string"),
    ("deep_json", 0, "2 JSON record(s) of tag 'gradwatch/explosions' refused (step 10: nested 702 deep"),
    ("vanishing_non_string", 2, "holds no JSON string"),
    ("truncated_tail", 0, "record cut short at byte"),
])
def test_report_exit_status_and_one_line_message(capsys, hostile, tmp_path, run, status, message):
    shutil.copytree(hostile[0] / run, tmp_path / run)
    got, out, err = report(capsys, str(tmp_path), "--json")
    assert got == status and message in err and err.count("\n") == (2 if run == "deep_json" else 1)  # one per tag
    if status == 0:
        assert json.loads(out)["runs"][0]["notes"]
    got, _, err = report(capsys, str(tmp_path), "--fail-on-explosion")
    assert got == status  # no explosion: never 1


def test_report_of_many_layers_and_long_names(capsys, hostile, tmp_path):
    for run in ("wide", "long_names"):
        shutil.copytree(hostile[0] / run, tmp_path / run)
    status, out, _ = report(capsys, str(tmp_path), "--json")
    document = json.loads(out)
    assert status == 0 and [run["run"] for run in document["runs"]] == ["long_names", "wide"]
    assert document["runs"][1]["top_layers"][0]["max_norm"] == 3.0


def test_report_escapes_controls_and_bidi_in_every_format(capsys, hostile, tmp_path):
    shutil.copytree(hostile[0] / EVIL_RUN, tmp_path / EVIL_RUN)
    for argv in ((), ("--json",), ("--fail-on-explosion",)):
        status, out, err = report(capsys, str(tmp_path), *argv)
        for char in ("\u202e", "\u009b", "\u200f"):
            assert char not in out and char not in err
    status, out, _ = report(capsys, str(tmp_path), "--json")
    assert json.loads(out)["runs"][0]["run"] == EVIL_RUN  # escaped, not changed
    assert "\\u202e" in out
    _, text, _ = report(capsys, str(tmp_path))
    assert "evil\\u202e\\x9b<img" in text


def test_report_epochs_count_from_1_like_the_log_lines(capsys, tmp_path):
    write_run(tmp_path / "r", explode={7})  # recorded with epoch 0 (Explosion.epoch)
    _, text, _ = report(capsys, str(tmp_path))
    row = next(line for line in text.splitlines() if line.strip().startswith("7 "))
    assert row.split()[:2] == ["7", "1"]
    _, out, _ = report(capsys, str(tmp_path), "--json")
    assert json.loads(out)["runs"][0]["explosions"]["records"][0]["epoch"] == 0


def test_report_read_while_a_fit_writes(capsys, tmp_path):
    """`gradwatch report` run again and again while `model.fit` writes: never an error."""
    import keras

    import gradwatch

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.random.default_rng(0).normal(size=(2, 512, 4)).astype("float32")[0], np.zeros((512, 1), "float32")
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=1, verbose=0)
    done = threading.Event()

    def fit():
        try:
            model.fit(x, y, batch_size=4, epochs=6, verbose=0, callbacks=[monitor])
        finally:
            done.set()

    thread = threading.Thread(target=fit)
    thread.start()
    statuses, reads = [], 0
    while not done.is_set() or reads < 3:
        status, out, err = report(capsys, str(tmp_path), "--json")
        statuses.append(status)
        if status == 0:
            reads += 1
            assert json.loads(out)["runs"][0]["steps"]["count"] >= 1
        else:
            assert "No gradwatch runs" in err  # before the first write only
    thread.join()
    assert reads >= 3 and 0 in statuses
    status, out, _ = report(capsys, str(tmp_path), "--json")
    assert status == 0 and json.loads(out)["runs"][0]["steps"] == {"first": 1, "last": 768, "count": 768}


def test_a_restart_at_step_1_writes_to_a_new_run(tmp_path, caplog):
    import keras

    import gradwatch
    from helpers import read_tags

    def model():
        built = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), keras.layers.Dense(1)])
        built.compile(optimizer="sgd", loss="mse")
        return built

    x, y = np.ones((32, 4), "float32"), np.zeros((32, 1), "float32")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    first = model()
    first.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[monitor])
    first.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])  # steps 9-12: same run
    assert not [r for r in caplog.records if "starts again at step 1" in r.getMessage()]
    model().fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])  # steps 1-4 again
    (warning,) = [r.getMessage() for r in caplog.records if "starts again at step 1" in r.getMessage()]
    assert str(tmp_path / "train_1") in warning and "steps up to 12" in warning
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, 13))
    assert sorted(read_tags(str(tmp_path), run="train_1")[tags.GLOBAL]) == [1, 2, 3, 4]
    model().fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert sorted(read_tags(str(tmp_path), run="train_2")[tags.GLOBAL]) == [1, 2, 3, 4]


def test_an_unforeseen_failure_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    from gradwatch import report as report_module

    write_run(tmp_path / "r", explode={3})

    def deep(*args):
        return deep(*args)  # RecursionError, as deep data once gave
    monkeypatch.setattr(report_module, "summarize", deep)
    status, out, err = report(capsys, str(tmp_path), "--fail-on-explosion")
    assert status == 2 and out == "" and err.startswith("gradwatch: error: could not report: RecursionError")
    assert err.count("\n") == 1

"""Issue 7: hostile or broken log folders, read by `gradwatch report` and the
TensorBoard plugin: no crash, no traceback, no path traversal, no huge allocation.

(tests/test_logs.py and tests/test_cli.py already cover truncated and garbage
files, malformed JSON, symlinks escaping LOGDIR and unicode run names.)
"""

import json
import struct

import numpy as np
import pytest
from werkzeug.test import Client

from gradwatch import cli, logs, tags
from gradwatch.summaries import EventWriter, encode_event
from tensorboard_plugin_gradwatch.tests.conftest import make_app
from test_logs import only_event_file, write_run

PREFIX = "/data/plugin/gradwatch"


def report(capsys, *argv):
    status = cli.main(["report", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def append_record(path, payload, length=None, valid_length_crc=True):
    """Appends one TFRecord (optionally lying about its length)."""
    length = len(payload) if length is None else length
    header = struct.pack("<Q", length)
    crc = logs.masked_crc32c(header) if valid_length_crc else 0
    with open(path, "ab") as stream:
        stream.write(header + struct.pack("<I", crc) + payload
                     + struct.pack("<I", logs.masked_crc32c(payload)))


def json_event(step, tag, text):
    from gradwatch.summaries import _string_tensor_value

    return encode_event(step, 0.0, _string_tensor_value(tag, text, tags.PLUGIN_NAME))


# -- gradwatch report / gradwatch.logs -----------------------------------------------------


def test_record_claiming_a_huge_length_is_refused_without_allocating(capsys, tmp_path):
    write_run(tmp_path / "r")
    path = only_event_file(tmp_path / "r")
    append_record(path, b"", length=2**62)  # the length checksum is right: only the size lies
    status, out, err = report(capsys, str(tmp_path))  # as a record cut short at the end: skipped
    assert status == 0 and "cut short at byte" in err and path in err and "1..40 (40)" in out


@pytest.mark.parametrize("payload, reason", [
    (json_event(5, tags.EXPLOSIONS, '[{"step": 1e400}]'), "unexpected record format"),  # int(inf)
    (json_event(5, tags.EXPLOSIONS, '[{"step": 3, "layers": 7}]'), "unexpected record format"),
    (json_event(5, tags.CLIPPING, '"not a list"'), "unexpected record format"),
])
def test_hostile_json_records_are_one_line_errors(capsys, tmp_path, payload, reason):
    write_run(tmp_path / "r")
    append_record(only_event_file(tmp_path / "r"), payload)
    status, _, err = report(capsys, str(tmp_path))
    assert status == 2 and reason in err and len(err.strip().splitlines()) == 1


def test_layer_list_of_the_wrong_shape_is_ignored(capsys, tmp_path):
    write_run(tmp_path / "r")
    append_record(only_event_file(tmp_path / "r"), json_event(50, tags.LAYERS, '{"not": "a list"}'))
    (run,) = logs.read_logdir(str(tmp_path))
    assert list(run.layer_norms) == ["embed", "lstm", "head/dense"]


def test_short_tensor_content_is_not_a_number(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2

    write_run(tmp_path / "r", steps=range(1, 4))
    tensor = tensor_pb2.TensorProto(dtype=1, tensor_content=b"\x00\x01")  # 2 of 4 float bytes
    event = event_pb2.Event(step=9, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tags.GLOBAL, tensor=tensor)]))
    append_record(only_event_file(tmp_path / "r"), event.SerializeToString())
    (run,) = logs.read_logdir(str(tmp_path))
    assert run.global_norm.steps.tolist() == [1, 2, 3]


def test_many_tags_are_read_and_reported(capsys, tmp_path):
    layers = [f"block_{i}/dense" for i in range(3000)]
    write_run(tmp_path / "wide", steps=range(1, 4), layers=layers + ["lstm"])
    (run,) = logs.read_logdir(str(tmp_path))
    assert len(run.layer_norms) == 3001 and run.step_count == 3
    status, out, _ = report(capsys, str(tmp_path), "--json")
    assert status == 0 and len(json.loads(out)["runs"][0]["top_layers"]) == 5


@pytest.mark.parametrize("name", ["run with spaces", "..hidden", "a..b", "ünïcødé ☃", "tab\tname"])
def test_odd_run_names(capsys, tmp_path, name):
    write_run(tmp_path / name / "train", explode={3})
    status, out, _ = report(capsys, str(tmp_path), "--json")
    assert status == 0 and json.loads(out)["runs"][0]["run"] == f"{name}/train"


def test_control_characters_in_names_are_escaped_in_the_text_report(capsys, tmp_path):
    write_run(tmp_path / "evil\x1b[2Jrun", explode={3}, layers=["lstm", "bell\x07layer", "embed"])
    status, out, _ = report(capsys, str(tmp_path))
    assert status == 0 and "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b[2Jrun" in out


# -- the TensorBoard plugin -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    write_run(root / "ünï cødé run", explode={5})
    write_run(root / "truncated", steps=range(1, 21))
    path = only_event_file(root / "truncated")
    append_record(path, b"\x00" * 64)  # then cut: TensorBoard keeps what came before
    with open(path, "r+b") as stream:
        stream.truncate(stream.seek(0, 2) - 30)
    writer = EventWriter(str(root / "garbled"))
    writer.write_scalars(1, {tags.GLOBAL: 1.0, tags.layer_tag("a"): 1.0})
    records = [{"step": 1, "layers": 7}, {"step": 1.5}, {"step": 2, "layers": [[["x"], 1.0], "y"]},
               {"step": 3, "layers": [["a", "NaN"]], "action": ["clipped"]}, "junk", 5]
    writer.write_json(3, tags.EXPLOSIONS, records)
    writer.write_json(3, tags.CLIPPING, {"step": 2})
    writer.write_json(3, tags.LAYERS, {"a": 1})
    writer.close()
    append_record(writer.path, json_event(4, tags.EXPLOSIONS, "[" * 50000 + "]" * 50000))
    wide = EventWriter(str(root / "wide"))
    for step in range(1, 4):
        values = {tags.layer_tag(f"l{i}"): float(i) for i in range(2000)}
        wide.write_scalars(step, dict(values, **{tags.GLOBAL: 1.0}))
    wide.close()
    return str(root)


@pytest.fixture(scope="module")
def hostile_client(hostile_logdir):
    app, _ = make_app(hostile_logdir)
    return Client(app)


def get(client, path):
    response = client.get(PREFIX + path)
    assert response.status_code in (200, 400, 404), response.get_data(as_text=True)
    return response.status_code, json.loads(response.get_data(as_text=True))


def test_plugin_lists_odd_and_broken_runs(hostile_client):
    status, body = get(hostile_client, "/runs")
    names = {run["name"] for run in body["runs"]}
    assert status == 200 and {"ünï cødé run", "truncated", "garbled", "wide"} <= names


@pytest.mark.parametrize("route", ["/heatmap", "/global", "/alerts", "/ranking"])
@pytest.mark.parametrize("run", ["ünï cødé run", "truncated", "garbled", "wide"])
def test_plugin_routes_answer_for_every_run(hostile_client, route, run):
    from urllib.parse import quote

    status, body = get(hostile_client, f"{route}?run={quote(run)}")
    assert status == 200, body


def test_plugin_keeps_the_valid_part_of_a_truncated_file(hostile_client):
    _, body = get(hostile_client, "/global?run=truncated&points=10000")
    assert body["last_step"] == 20


def test_plugin_skips_records_of_the_wrong_shape(hostile_client):
    _, body = get(hostile_client, "/alerts?run=garbled")
    assert [row["step"] for row in body["alerts"]] == [1, 2, 3]
    assert all(row["top_layers"] == [] or row["top_layers"] == [["a", "nan"]] for row in body["alerts"])
    assert body["alerts"][2]["action"] is None
    _, body = get(hostile_client, "/heatmap?run=garbled")
    assert body["layers"] == ["a"]


def test_plugin_wide_run_heatmap(hostile_client):
    _, body = get(hostile_client, "/heatmap?run=wide&columns=10")
    assert len(body["layers"]) == 2000 and body["columns"] == 3
    cells = np.frombuffer(__import__("base64").b64decode(body["cells"]), dtype="<f4")
    assert cells.size == 2000 * 3


@pytest.mark.parametrize("run", ["../ünï cødé run", "..%2F..%2Fetc", "/etc/passwd", "train/../../x",
                                 "%00", "a" * 5000])
def test_plugin_run_parameter_is_a_name_not_a_path(hostile_client, run):
    status, body = get(hostile_client, f"/heatmap?run={run}")
    assert status == 404 and "error" in body


def test_plugin_static_routes_do_not_traverse(hostile_client):
    for path in ("/../plugin.py", "/..%2Fplugin.py", "/static/../plugin.py", "/%2e%2e/plugin.py"):
        assert hostile_client.get(PREFIX + path).status_code == 404

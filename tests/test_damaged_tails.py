"""Issue 21: a run whose last record is damaged in any way -- header or data cut
short, a bad length or data checksum, zeros appended or written over it (power
loss) -- is read up to the damage, as TensorBoard reads it: `gradwatch report`
exits 0 with one note naming the file and the byte, and the plugin serves the
steps before the damage."""

import json
import os
import struct
from urllib.parse import quote

import pytest
from werkzeug.test import Client

from gradwatch import cli, logs
from helpers import read_tags
from tensorboard_plugin_gradwatch.tests.conftest import make_app
from test_logs import only_event_file, write_run


STEPS = 20


def flip(path, offset):
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x5A]))


def damage(path, kind):
    """Damages the file's tail; returns `(byte offset named, last step left)`."""
    last = [offset for offset, _ in logs.iter_records(path)][-1]  # step STEPS's record
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        stream.seek(last)
        length = struct.unpack("<Q", stream.read(8))[0]
    if kind == "header_cut":
        os.truncate(path, last + 5)
    elif kind == "length":
        flip(path, last + 1)
    elif kind == "length_crc":
        flip(path, last + 9)
    elif kind == "data":
        flip(path, last + 12 + length // 2)
    elif kind == "data_crc":
        flip(path, last + 12 + length + 2)
    elif kind == "data_cut":
        os.truncate(path, last + 12 + length // 2)
    elif kind == "zeros_over_last":  # power loss: the file's length was written, not its data
        with open(path, "r+b") as stream:
            stream.seek(last)
            stream.write(bytes(size - last))
    elif kind == "zeros_appended":
        with open(path, "ab") as stream:
            stream.write(bytes(4096))
        return size, STEPS
    return last, STEPS - 1


KINDS = ["header_cut", "length", "length_crc", "data", "data_crc", "data_cut", "zeros_over_last", "zeros_appended"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """One run per kind of damage: `(root, {kind: (event file, byte, last step)})`."""
    root = tmp_path_factory.mktemp("damaged21")
    found = {}
    for kind in KINDS:
        write_run(root / kind, steps=range(1, STEPS + 1))
        path = only_event_file(root / kind)
        found[kind] = (path, *damage(path, kind))
    return root, found


@pytest.mark.parametrize("kind", KINDS)
def test_report_reads_up_to_the_damage_with_one_note(capsys, damaged, tmp_path, kind):
    root, found = damaged
    path, offset, last_step = found[kind]
    status = cli.main(["report", os.path.join(root, kind), "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert json.loads(out)["runs"][0]["steps"] == {"first": 1, "last": last_step, "count": last_step}
    assert err.count("\n") == 1 and err.startswith("gradwatch: note: ")
    assert path in err and f"at byte {offset} " in err and "Traceback" not in err
    # TensorBoard's own loader reads the same steps
    assert sorted(read_tags(os.path.join(root, kind), run=".")["grad_norm/global"]) == list(range(1, last_step + 1))


def test_text_report_of_all_damaged_runs_exits_0(capsys, damaged):
    root, found = damaged
    status = cli.main(["report", str(root)])
    out, err = capsys.readouterr()
    assert status == 0 and err.count("\n") == len(KINDS)
    for kind, (path, offset, _) in found.items():
        assert sum(path in line and f"at byte {offset} " in line for line in err.splitlines()) == 1


def test_plugin_serves_the_steps_before_the_damage(damaged):
    root, found = damaged
    app, _ = make_app(str(root))
    client = Client(app)
    for kind, (_, _, last_step) in found.items():
        response = client.get("/data/plugin/gradwatch/global?points=100&run=" + quote(kind))
        assert response.status_code == 200, kind
        assert json.loads(response.get_data(as_text=True))["last_step"] == last_step, kind


def test_damage_with_a_record_after_it_is_still_an_error(tmp_path):
    write_run(tmp_path / "r", steps=range(1, STEPS + 1))
    path = only_event_file(tmp_path / "r")
    offsets = [offset for offset, _ in logs.iter_records(path)]
    flip(path, offsets[-2] + 9)  # the last record is whole after it
    with pytest.raises(logs.LogReadError, match=f"corrupt record at byte {offsets[-2]} "):
        logs.read_logdir(str(tmp_path))

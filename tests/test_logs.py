"""Tests of `gradwatch.logs`: reading gradwatch event files back exactly."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gradwatch import logs, runreader, tags
from gradwatch.summaries import EventWriter

LAYERS = ["embed", "lstm", "head/dense"]


def write_run(run_dir, steps=range(1, 41), explode=(), nan_steps=(), inf_steps=(),
              clip_step=None, layers=LAYERS, seed=0):
    """Writes a realistic run as the monitor does; returns the global norms written.

    Explosions at `explode` (norm 1e4, led by "lstm"), NaN / Inf global norms at
    `nan_steps` / `inf_steps` (recorded as non-finite explosions), clipping
    switched on at `clip_step`.
    """
    rng = np.random.default_rng(seed)
    writer = EventWriter(str(run_dir))
    writer.write_json(0, tags.LAYERS, list(layers))
    written, records = {}, []
    for step in steps:
        layer_norms = {name: float(rng.uniform(0.1, 1.0)) for name in layers}
        norm = float(np.float32(math.sqrt(sum(v * v for v in layer_norms.values()))))
        if step in explode or step in nan_steps or step in inf_steps:
            norm = 1e4 if step in explode else (math.nan if step in nan_steps else math.inf)
            layer_norms["lstm"] = norm
            records.append({"step": step, "epoch": 0, "global_norm": norm, "threshold": 40.0,
                            "layers": [["lstm", norm], ["embed", 0.5]],
                            "action": "clipping_on" if step == clip_step else "none",
                            "nonfinite": not math.isfinite(norm)})
        values = {tags.GLOBAL: norm}
        values.update({tags.layer_tag(name): v for name, v in layer_norms.items()})
        writer.write_scalars(step, values)
        written[step] = norm
    if records:
        safe = [dict(r, global_norm=_safe(r["global_norm"]),
                     layers=[[n, _safe(v)] for n, v in r["layers"]]) for r in records]
        writer.write_json(max(steps), tags.EXPLOSIONS, safe)
    if clip_step is not None:
        writer.write_json(max(steps), tags.CLIPPING, [
            {"step": clip_step, "epoch": 0, "mode": "clipnorm", "threshold": 1.0,
             "cause_step": clip_step}])
    writer.close()
    return written


def _safe(value):
    from gradwatch.summaries import json_safe
    return json_safe(value)


def only_event_file(run_dir):
    (name,) = [n for n in os.listdir(run_dir) if n.startswith(logs.EVENT_FILE_PREFIX)]
    return os.path.join(run_dir, name)


def test_reads_a_run_exactly(tmp_path):
    written = write_run(tmp_path / "train", explode={12}, nan_steps={20}, clip_step=12)
    (run,) = logs.read_logdir(str(tmp_path))
    assert run.name == "train"
    assert (run.first_step, run.last_step, run.step_count) == (1, 40, 40)
    np.testing.assert_array_equal(run.global_norm.steps, np.arange(1, 41))
    expected = np.array([written[s] for s in range(1, 41)], dtype=np.float32)
    np.testing.assert_array_equal(run.global_norm.values.astype(np.float32), expected)
    assert list(run.layer_norms) == LAYERS
    assert run.layer_norms["lstm"].values.dtype == np.float32
    assert [e.step for e in run.explosions] == [12, 20]
    assert run.explosions[0].leading_layer == "lstm"
    assert run.explosions[0].action == tags.ACTION_CLIP_ON
    assert math.isnan(run.explosions[1].global_norm) and run.explosions[1].nonfinite
    assert math.isnan(run.explosions[1].layers[0][1])
    (clip,) = run.clipping
    assert (clip.step, clip.mode, clip.threshold, clip.cause_step) == (12, "clipnorm", 1.0, 12)


def test_nan_and_inf_norms_are_floats(tmp_path):
    write_run(tmp_path / "r", nan_steps={3}, inf_steps={5})
    (run,) = logs.read_logdir(str(tmp_path))
    values = dict(zip(run.global_norm.steps.tolist(), run.global_norm.values.tolist()))
    assert math.isnan(values[3]) and values[5] == math.inf
    assert run.explosions[1].global_norm == math.inf


def test_several_event_files_last_written_step_wins(tmp_path):
    write_run(tmp_path / "r", steps=range(1, 31), explode={25}, seed=1)
    # EventWriter names files by second and pid: keep the first file apart.
    os.rename(only_event_file(tmp_path / "r"), tmp_path / "r" / "events.out.tfevents.1.first")
    resumed = write_run(tmp_path / "r", steps=range(21, 51), explode={25}, seed=2)
    (run,) = logs.read_logdir(str(tmp_path))
    np.testing.assert_array_equal(run.global_norm.steps, np.arange(1, 51))
    assert run.global_norm.values[24] == pytest.approx(resumed[25])
    assert [e.step for e in run.explosions] == [25]


def test_fast_path_matches_protobuf_parsing(tmp_path, monkeypatch):
    write_run(tmp_path / "r", steps=range(1, 61), explode={7}, nan_steps={9}, inf_steps={11})
    fast = logs.read_logdir(str(tmp_path))[0]
    monkeypatch.setattr(runreader.RunReader, "_MAX_LAYOUTS", 0)  # every event parsed by protobuf
    slow = logs.read_logdir(str(tmp_path))[0]
    for ours, theirs in [(fast.global_norm, slow.global_norm)] + [
            (fast.layer_norms[n], slow.layer_norms[n]) for n in LAYERS]:
        np.testing.assert_array_equal(ours.steps, theirs.steps)
        np.testing.assert_array_equal(ours.values.astype(np.float32), theirs.values.astype(np.float32))


def test_reads_scalars_written_by_tf_summary(tmp_path):
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(tmp_path / "tf"))
    with writer.as_default():
        for step in range(1, 6):
            tf.summary.scalar(tags.GLOBAL, float(step), step=step)
            tf.summary.scalar(tags.layer_tag("dense"), 0.5 * step, step=step)
            tf.summary.scalar("loss", 1.0, step=step)
    writer.close()
    (run,) = logs.read_logdir(str(tmp_path))
    np.testing.assert_array_equal(run.global_norm.values, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(run.layer_norms["dense"].values, [0.5, 1, 1.5, 2, 2.5])


def test_runs_found_recursively_with_odd_names(tmp_path):
    names = ["exp 1/train", "défi/ünïcode run", "plain"]
    for name in names:
        write_run(tmp_path / name, steps=range(1, 4))
    other = EventWriter(str(tmp_path / "not gradwatch"))  # events without gradwatch data
    other.write_scalars(1, {"loss": 1.0})
    other.close()
    runs = logs.read_logdir(str(tmp_path))
    assert sorted(run.name for run in runs) == sorted(names)


def test_logdir_itself_can_be_the_run(tmp_path):
    write_run(tmp_path, steps=range(1, 4))
    assert [run.name for run in logs.read_logdir(str(tmp_path))] == ["."]


def test_symlinks_escaping_logdir_are_ignored(tmp_path):
    outside = tmp_path / "outside"
    write_run(outside / "secret", steps=range(1, 4))
    logdir = tmp_path / "logdir"
    write_run(logdir / "inside", steps=range(1, 4))
    os.symlink(outside / "secret", logdir / "linked_dir")
    (logdir / "file_link").mkdir()
    os.symlink(only_event_file(outside / "secret"),
               logdir / "file_link" / "events.out.tfevents.1.link")
    os.symlink(logdir / "inside", logdir / "inner_alias")  # inside LOGDIR: read once
    assert [run.name for run in logs.read_logdir(str(logdir))] == ["inside"]


def test_truncated_tail_is_skipped_with_a_note(tmp_path):
    written = write_run(tmp_path / "r")
    path = only_event_file(tmp_path / "r")
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) - 7)  # inside the last record: step 40's norms
    (run,) = logs.read_logdir(str(tmp_path))
    assert run.global_norm.steps.tolist() == sorted(written)[:-1]
    np.testing.assert_array_equal(run.global_norm.values, [written[step] for step in range(1, 40)])
    (note,) = run.notes
    assert path in note and "cut short at byte" in note


def test_damage_before_the_end_is_an_error_naming_file_and_offset(tmp_path):
    write_run(tmp_path / "r")
    path = only_event_file(tmp_path / "r")
    offsets = [offset for offset, _ in logs.iter_records(path)]
    with open(path, "r+b") as stream:
        stream.seek(offsets[5] + 2)
        stream.write(b"\xff")  # the length of record 5 no longer matches its checksum
    with pytest.raises(logs.LogReadError, match=f"corrupt record at byte {offsets[5]}") as info:
        logs.read_logdir(str(tmp_path))
    assert info.value.path == path


def test_garbage_file_raises_log_read_error(tmp_path):
    (tmp_path / "r").mkdir()
    path = tmp_path / "r" / "events.out.tfevents.123.host"
    path.write_bytes(os.urandom(300))
    with pytest.raises(logs.LogReadError, match="corrupt"):
        logs.read_logdir(str(tmp_path))


def test_malformed_json_record_raises_log_read_error(tmp_path):
    writer = EventWriter(str(tmp_path / "r"))
    writer.write_json(3, tags.EXPLOSIONS, {"not": "a list"})
    writer.close()
    with pytest.raises(logs.LogReadError, match="unexpected record format"):
        logs.read_logdir(str(tmp_path))


def test_masked_crc32c_matches_tensorboard():
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    for data in (b"", b"\x00" * 8, b"gradwatch", bytes(range(256))):
        assert logs.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


def test_reading_does_not_import_tensorflow(tmp_path):
    write_run(tmp_path / "r", steps=range(1, 4))
    code = ("import sys; from gradwatch import logs; logs.read_logdir(sys.argv[1]); "
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_any_gradwatch_tag_makes_a_run(tmp_path):
    writer = EventWriter(str(tmp_path / "alerts only"))
    writer.write_text(5, tags.ALERTS_TEXT, "gradient explosion at step 5")
    writer.close()
    (run,) = logs.read_logdir(str(tmp_path))
    assert run.name == "alerts only" and run.step_count == 0 and run.first_step is None

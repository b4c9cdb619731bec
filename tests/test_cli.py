"""Tests of the `gradwatch` command (`gradwatch.cli.main` and the console script)."""

import json
import os
import shutil
import subprocess

import pytest

import gradwatch
from gradwatch.cli import main
from test_logs import only_event_file, write_run


def run_main(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def strict_json(text):
    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")
    return json.loads(text, parse_constant=reject)


def assert_one_line_error(err, *fragments):
    assert err.startswith("gradwatch: error: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@pytest.fixture
def exploded_logdir(tmp_path):
    write_run(tmp_path / "rnn" / "train", explode={17}, nan_steps={30}, clip_step=17)
    write_run(tmp_path / "mlp run", steps=range(1, 21))
    return tmp_path


def test_text_report_names_runs_and_explosion_step(capsys, exploded_logdir):
    status, out, _ = run_main(capsys, "report", str(exploded_logdir))
    assert status == 0
    assert "rnn/train" in out and "mlp run" in out
    assert "first at step 17" in out
    assert "clipnorm switched on at step 17" in out
    assert "lstm" in out


def test_json_report_holds_runs_and_explosions(capsys, exploded_logdir):
    status, out, _ = run_main(capsys, "report", str(exploded_logdir), "--json")
    assert status == 0
    document = strict_json(out)
    assert document["gradwatch_report_version"] == 1
    assert document["logdir"] == str(exploded_logdir)
    runs = {run["run"]: run for run in document["runs"]}
    assert set(runs) == {"rnn/train", "mlp run"}
    rnn = runs["rnn/train"]
    assert rnn["steps"] == {"first": 1, "last": 40, "count": 40}
    assert rnn["global_norm"]["max"] == 1e4 and rnn["global_norm"]["nonfinite"] == 1
    explosions = rnn["explosions"]
    assert (explosions["count"], explosions["first_step"]) == (2, 17)
    assert (explosions["worst"], explosions["worst_step"], explosions["nonfinite"]) == ("nan", 30, 1)
    assert [r["step"] for r in explosions["records"]] == [17, 30]
    assert explosions["records"][1]["layers"][0] == ["lstm", "nan"]
    assert rnn["top_layers"][0]["layer"] == "lstm"
    assert rnn["top_layers"][0]["explosions_led"] == 2
    assert rnn["clipping"] == [{"step": 17, "mode": "clipnorm", "threshold": 1.0, "cause_step": 17,
                                "restarted": False, "restart_step": None}]
    assert runs["mlp run"]["explosions"]["count"] == 0
    assert runs["mlp run"]["explosions"]["first_step"] is None


def test_inf_norms_are_strings_in_json(capsys, tmp_path):
    write_run(tmp_path / "r", inf_steps={4})
    _, out, _ = run_main(capsys, "report", str(tmp_path), "--json")
    explosions = strict_json(out)["runs"][0]["explosions"]
    assert explosions["worst"] == "inf" and explosions["records"][0]["global_norm"] == "inf"


def test_fail_on_explosion_exits_1_and_names_the_run(capsys, exploded_logdir):
    status, out, err = run_main(capsys, "report", str(exploded_logdir), "--fail-on-explosion")
    assert status == 1
    assert "'rnn/train' exploded" in err and "step 17" in err
    assert "mlp run" not in err


def test_fail_on_explosion_exits_0_without_explosions(capsys, tmp_path):
    write_run(tmp_path / "healthy")
    status, out, _ = run_main(capsys, "report", str(tmp_path), "--fail-on-explosion", "--json")
    assert status == 0
    assert strict_json(out)["runs"][0]["run"] == "healthy"


def test_missing_folder(capsys, tmp_path):
    status, out, err = run_main(capsys, "report", str(tmp_path / "nowhere"))
    assert status == 2 and out == ""
    assert_one_line_error(err, "does not exist", "nowhere")


def test_folder_without_runs(capsys, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    status, _, err = run_main(capsys, "report", str(tmp_path / "empty"))
    assert status == 2
    assert_one_line_error(err, "No gradwatch runs")


def test_truncated_event_file_is_reported_up_to_the_cut(capsys, tmp_path):
    write_run(tmp_path / "r")
    path = only_event_file(tmp_path / "r")
    with open(path, "r+b") as stream:
        stream.truncate(os.path.getsize(path) - 3)
    status, out, err = run_main(capsys, "report", str(tmp_path), "--json")
    assert status == 0 and strict_json(out)["runs"][0]["steps"]["count"] == 39
    assert err.startswith("gradwatch: note: run 'r': ") and path in err and err.count("\n") == 1


def test_garbage_event_file(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "events.out.tfevents.1.garbage").write_bytes(b"not an event file\n" * 20)
    status, _, err = run_main(capsys, "report", str(tmp_path))
    assert status == 2
    assert_one_line_error(err, "corrupt")


def test_symlink_escaping_logdir_is_not_reported(capsys, tmp_path):
    write_run(tmp_path / "outside" / "secret", explode={5})
    write_run(tmp_path / "logdir" / "mine")
    os.symlink(tmp_path / "outside" / "secret", tmp_path / "logdir" / "escape")
    status, out, _ = run_main(capsys, "report", str(tmp_path / "logdir"), "--json",
                              "--fail-on-explosion")
    assert status == 0
    assert [run["run"] for run in strict_json(out)["runs"]] == ["mine"]


def test_unicode_run_names(capsys, tmp_path):
    write_run(tmp_path / "essai n°1" / "entraînement", explode={3})
    _, out, _ = run_main(capsys, "report", str(tmp_path))
    assert "essai n°1/entraînement" in out
    _, out, _ = run_main(capsys, "report", str(tmp_path), "--json")
    assert strict_json(out)["runs"][0]["run"] == "essai n°1/entraînement"


@pytest.mark.parametrize("argv", [["--help"], ["report", "--help"], ["demo", "--help"]])
def test_help_on_every_command(capsys, argv):
    status, out, _ = run_main(capsys, *argv)
    assert status == 0 and "usage: gradwatch" in out


def test_version(capsys):
    status, out, _ = run_main(capsys, "--version")
    assert status == 0 and out.strip() == f"gradwatch {gradwatch.__version__}"


def test_usage_errors_exit_2(capsys):
    assert run_main(capsys)[0] == 2
    assert run_main(capsys, "report")[0] == 2
    assert run_main(capsys, "report", "x", "--bogus")[0] == 2


def test_demo_trains_leaves_event_files_and_says_how_to_look(capsys, tmp_path):
    """As a user runs it (its own process, TF_CPP_MIN_LOG_LEVEL unset): its first line is its own,
    and nothing of TensorFlow's start-up (absl, cudart_stub) reaches the terminal."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-m", "gradwatch.cli", "demo", "--logdir", str(tmp_path / "demo"),
                           "--epochs", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("gradwatch demo: a ReLU SimpleRNN")
    assert f"tensorboard --logdir {tmp_path / 'demo'}" in done.stdout
    for run in ("plain", "gradwatch_auto_clip"):
        assert list((tmp_path / "demo" / run / "train").glob("events.out.tfevents.*"))
    assert run_main(capsys, "report", str(tmp_path / "demo"))[0] == 0


def test_demo_rejects_a_bad_epoch_count(capsys):
    status, _, err = run_main(capsys, "demo", "--epochs", "0")
    assert status == 2 and "--epochs" in err


def test_console_script(exploded_logdir):
    script = shutil.which("gradwatch")
    assert script, "the gradwatch console script is not installed (pip install -e .)"
    result = subprocess.run([script, "report", str(exploded_logdir), "--fail-on-explosion"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "rnn/train" in result.stdout and "first at step 17" in result.stdout
    assert "Traceback" not in result.stderr
    missing = subprocess.run([script, "report", str(exploded_logdir / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("gradwatch: error: ")


def test_demo_keeps_tensorflow_log_setting_the_user_chose(monkeypatch):
    from gradwatch import demo

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    assert demo.import_tensorflow_quietly() is False and os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"

"""The clipping sweep (`gradwatch.ClippingSweep`): trials, ranking, reproduction,
resume, divergence, "auto" thresholds against the probe's logged norms, HParams."""

import json
import math
import os
import sys

import keras
import numpy as np
import pytest

import gradwatch
from gradwatch import tags
from gradwatch.sweep import results as results_lib
from gradwatch.sweep import thresholds as thresholds_lib
from helpers import read_tags

pytest.importorskip("keras_tuner")

FIT = dict(epochs=2, batch_size=32, verbose=0)
# The tests using the module's `auto_sweep` (the slowest fixture of the suite) run on one
# pytest-xdist worker (`--dist loadgroup`, pyproject.toml), so it is built once.
SHARES_AUTO_SWEEP = pytest.mark.xdist_group("test_sweep.auto_sweep")


def corrupted_regression(seed=0, n=256, corrupt=4, scale=60.0):
    """Linear targets with a few corrupted (x `scale`) training targets; clean validation."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(6, 1)).astype("float32")
    x = rng.normal(size=(n, 6)).astype("float32")
    y = x @ w
    y[rng.choice(n, corrupt, replace=False)] *= scale
    x_val = rng.normal(size=(64, 6)).astype("float32")
    return x, y, (x_val, x_val @ w)


class Builder:
    """`build_model` that counts its calls."""

    def __init__(self, learning_rate=0.02, layers=(16,), bias=True):
        self.calls = 0
        self.learning_rate, self.layers, self.bias = learning_rate, layers, bias

    def __call__(self):
        self.calls += 1
        model = keras.Sequential([keras.Input((6,))] + [
            keras.layers.Dense(units, activation="relu", use_bias=self.bias) for units in self.layers]
            + [keras.layers.Dense(1, use_bias=self.bias)])
        model.compile(keras.optimizers.SGD(self.learning_rate, momentum=0.9), "mse")
        return model


def reproduce(build, trial, x, y, seed=0, **fit_kwargs):
    """The documented recipe: seed, build, set the clipping, fit; the best epoch's value."""
    keras.utils.set_random_seed(seed)
    model = build()
    if trial.mode is not None:
        setattr(model.optimizer, trial.mode, trial.threshold)
    history = model.fit(x, y, **fit_kwargs)
    return min(history.history["val_loss"])


@pytest.fixture(scope="module")
def auto_sweep(tmp_path_factory):
    """A default sweep (every mode, thresholds="auto") of a small MLP, and its inputs."""
    x, y, val = corrupted_regression()
    build = Builder()
    log_dir = str(tmp_path_factory.mktemp("sweep"))
    sweep = gradwatch.ClippingSweep(build, log_dir=log_dir, verbose=0)
    results = sweep.search(x, y, validation_data=val, **FIT)
    return dict(sweep=sweep, results=results, build=build, x=x, y=y, val=val, log_dir=log_dir)


@SHARES_AUTO_SWEEP
def test_every_mode_and_threshold_is_a_trial(auto_sweep):
    results = auto_sweep["results"]
    settings = json.load(open(os.path.join(auto_sweep["log_dir"], results_lib.SWEEP_FILE)))
    expected = {(None, None)} | {(mode, entry["value"]) for mode, entries in settings["thresholds"].items()
                                 for entry in entries}
    assert {(t.mode, t.threshold) for t in results.trials} == expected
    for mode in ("clipvalue", "clipnorm", "global_clipnorm"):
        values = [t.threshold for t in results.trials if t.mode == mode]
        assert len(values) >= 3
    assert len(results.trials) == len(expected)
    assert all(t.status == "COMPLETED" and t.steps == 16 for t in results.trials)
    # Each trial has its own gradwatch run with one global norm per step.
    for trial in results.trials:
        assert sorted(read_tags(trial.log_dir)[tags.GLOBAL]) == list(range(1, 17))


@SHARES_AUTO_SWEEP
def test_best_is_the_lowest_finite_objective_and_printing_ranks(auto_sweep):
    results = auto_sweep["results"]
    finite = [t for t in results.trials if not t.diverged]
    assert results.best.value == min(t.value for t in finite)
    ranked = results.ranked()
    assert ranked[0] is results.best
    assert [t.value for t in ranked if not t.diverged] == sorted(t.value for t in finite)
    text = str(results)
    lines = text.splitlines()
    assert results.best.name in lines[2]  # first row of the table, after title and header
    assert "best: " + results.best.name in text


@SHARES_AUTO_SWEEP
def test_best_trial_is_reproduced_by_the_documented_recipe(auto_sweep):
    s = auto_sweep
    best = s["results"].best
    assert best.mode is not None  # clipping helps on corrupted targets
    again = reproduce(s["build"], best, s["x"], s["y"], validation_data=s["val"], **FIT)
    assert again == pytest.approx(best.value, rel=1e-6)
    baseline = s["results"].baseline
    assert reproduce(s["build"], baseline, s["x"], s["y"], validation_data=s["val"], **FIT) == \
        pytest.approx(baseline.value, rel=1e-6)


@SHARES_AUTO_SWEEP
def test_resume_trains_and_builds_nothing(auto_sweep):
    s = auto_sweep
    build = Builder()
    again = gradwatch.ClippingSweep(build, log_dir=s["log_dir"], verbose=0).search(
        s["x"], s["y"], validation_data=s["val"], **FIT)
    assert build.calls == 0
    assert again == s["results"]


@SHARES_AUTO_SWEEP
def test_auto_thresholds_come_from_the_probe_runs_logged_norms(auto_sweep):
    s = auto_sweep
    probe = read_tags(os.path.join(s["log_dir"], results_lib.PROBE_RUN))
    monitor_global = probe[tags.GLOBAL]
    stats = {mode: probe[tag] for mode, tag in tags.SWEEP_PROBE_STATISTICS.items()}
    steps = sorted(stats["global_clipnorm"])
    assert len(steps) >= thresholds_lib.MIN_STEPS
    # The probe's own measurement equals the norm the monitor logged, step by step.
    for step in steps:
        assert stats["global_clipnorm"][step] == pytest.approx(monitor_global[step], rel=1e-5)
        assert stats["clipnorm"][step] <= stats["global_clipnorm"][step] * (1 + 1e-6)
    settings = json.load(open(os.path.join(s["log_dir"], results_lib.SWEEP_FILE)))
    for mode, series in stats.items():
        values = np.array([series[step] for step in steps])
        chosen = [entry["value"] for entry in settings["thresholds"][mode]]
        assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen) >= 3
        expected = sorted({thresholds_lib.round_significant(v) for v in (
            0.1 * np.percentile(values, 50), np.percentile(values, 10), np.percentile(values, 50),
            np.percentile(values, 90))})
        assert chosen == pytest.approx(expected, rel=1e-3)
        fractions = [entry["clipped_fraction"] for entry in settings["thresholds"][mode]]
        assert fractions == [pytest.approx(np.mean(values > t)) for t in chosen]
        assert fractions[0] > 0.9 and fractions[-1] <= 0.25  # "clips most" to "only outliers" (16 steps)


def test_per_variable_statistic_equals_the_global_norm_with_one_variable(tmp_path):
    x, y, val = corrupted_regression()
    # One kernel: per-variable norm == global norm. The claim is about the probe and the
    # thresholds it chooses, stored (in the sweep file the trials are made from) before
    # any trial: the first trial's build (the builder's 2nd call, after the probe's)
    # interrupts the sweep, so no trial is trained.
    build = InterruptingBuilder(2, layers=(), bias=False)
    sweep = gradwatch.ClippingSweep(build, log_dir=str(tmp_path), modes=("clipnorm", "global_clipnorm"),
                                    probe_steps=12, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        sweep.search(x, y, validation_data=val, epochs=1, batch_size=16, verbose=0)
    assert build.calls == 2  # the probe, then the interrupted first trial
    settings = json.load(open(tmp_path / results_lib.SWEEP_FILE))
    by_mode = {m: [entry["value"] for entry in settings["thresholds"][m]] for m in ("clipnorm", "global_clipnorm")}
    assert len(by_mode["clipnorm"]) >= 3 and by_mode["clipnorm"] == by_mode["global_clipnorm"]
    probe = read_tags(str(tmp_path / results_lib.PROBE_RUN))
    per_variable = probe[tags.SWEEP_PROBE_STATISTICS["clipnorm"]]
    assert len(per_variable) == 12
    global_norm = probe[tags.SWEEP_PROBE_STATISTICS["global_clipnorm"]]
    assert sorted(per_variable) == sorted(global_norm)
    for step in per_variable:
        assert per_variable[step] == pytest.approx(global_norm[step], rel=1e-6)


def test_diverging_trials_rank_last_and_never_stop_the_sweep(tmp_path):
    x, y, val = corrupted_regression(scale=3000.0, corrupt=8)
    build = Builder(learning_rate=0.5)
    # No clipping and three clipnorm thresholds too large to act diverge: four
    # in a row, more than KerasTuner's default of 3 consecutive failures; the
    # global_clipnorm trial after them still runs.
    sweep = gradwatch.ClippingSweep(
        build, log_dir=str(tmp_path), modes=("clipnorm", "global_clipnorm"),
        thresholds={"clipnorm": [1e30, 2e30, 3e30], "global_clipnorm": [0.01]}, verbose=0)
    results = sweep.search(x, y, validation_data=val, **FIT)
    assert len(results.trials) == 5 and all(t.status == "COMPLETED" for t in results.trials)
    diverged = [t for t in results.trials if t.diverged]
    assert {t.mode for t in diverged} == {None, "clipnorm"} and len(diverged) == 4
    for trial in diverged:
        assert trial.value == math.inf
        assert trial.steps < 16  # stopped at once, within the first epoch or two
    assert results.best.mode == "global_clipnorm" and math.isfinite(results.best.value)
    assert all(t.diverged for t in results.ranked()[-4:])
    assert "no clipping diverged" in results.recommendation()


def test_explicit_thresholds_list_applies_to_every_mode(tmp_path):
    x, y, val = corrupted_regression()
    sweep = gradwatch.ClippingSweep(Builder(), log_dir=str(tmp_path), modes=("clipnorm", "clipvalue"),
                                    thresholds=[1.0, 0.1], verbose=0)
    results = sweep.search(x, y, validation_data=val, epochs=1, batch_size=64, verbose=0)
    assert sorted((t.mode or "", t.threshold or 0) for t in results.trials) == [
        ("", 0), ("clipnorm", 0.1), ("clipnorm", 1.0), ("clipvalue", 0.1), ("clipvalue", 1.0)]
    assert not os.path.exists(tmp_path / results_lib.PROBE_RUN)  # no probe for given thresholds
    for changed in (dict(thresholds=[2.0]), dict(thresholds=[1.0, 0.1], seed=1),
                    dict(thresholds=[1.0, 0.1], objective="loss")):
        args = dict(log_dir=str(tmp_path), modes=("clipnorm", "clipvalue"), verbose=0, **changed)
        with pytest.raises(ValueError, match="other settings"):
            gradwatch.ClippingSweep(Builder(), **args).search(x, y, validation_data=val)


@SHARES_AUTO_SWEEP
def test_hparams_plugin_lists_every_trial(auto_sweep):
    from tensorboard import program
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.core import core_plugin
    from tensorboard.plugins.hparams import hparams_plugin
    from tensorboard.plugins.scalar import scalars_plugin
    from werkzeug.test import Client

    board = program.TensorBoard(plugins=[
        core_plugin.CorePluginLoader(), base_plugin.BasicLoader(scalars_plugin.ScalarsPlugin),
        base_plugin.BasicLoader(hparams_plugin.HParamsPlugin)])
    board.configure(["tensorboard", "--logdir", auto_sweep["log_dir"], "--reload_interval", "0",
                     "--reload_task", "blocking", "--load_fast", "false"])
    ingester = data_ingester.LocalDataIngester(board.flags)
    ingester.start()
    client = Client(application.TensorBoardWSGIApp(
        board.flags, board.plugin_loaders, ingester.data_provider, board.assets_zip_provider,
        ingester.deprecated_multiplexer))
    experiment = client.post("/data/plugin/hparams/experiment", json={"experimentName": ""}).get_json()
    assert {h["name"] for h in experiment["hparamInfos"]} == {"mode", "threshold"}
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {
        tags.SWEEP_OBJECTIVE, tags.SWEEP_DIVERGED, tags.SWEEP_EXPLOSIONS}
    groups = client.post("/data/plugin/hparams/session_groups", json={
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                  "STATUS_RUNNING"],
        "colParams": [], "startIndex": 0, "sliceSize": 100}).get_json()
    results = auto_sweep["results"]
    assert groups["totalSize"] == len(results.trials)
    by_id = {t.trial_id: t for t in results.trials}
    for group in groups["sessionGroups"]:
        trial = by_id[group["name"]]  # the group of a trial is named by its trial id
        assert [s["name"] for s in group["sessions"]] == [os.path.basename(trial.log_dir)]
        assert group["hparams"]["mode"] == (trial.mode or "none")
        if trial.mode is not None:
            assert group["hparams"]["threshold"] == pytest.approx(trial.threshold)
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        assert metrics[tags.SWEEP_OBJECTIVE] == pytest.approx(trial.value, rel=1e-6)
        assert metrics[tags.SWEEP_EXPLOSIONS] == trial.explosions


@pytest.mark.parametrize("kwargs, match", [
    (dict(build_model=None), "build_model"),
    (dict(objective="val_foo"), "objective"),
    (dict(objective=3), "objective"),
    (dict(modes=()), "modes"),
    (dict(modes=("clipnorm", "clipnorm")), "modes"),
    (dict(modes=("clipnom",)), "modes"),
    (dict(thresholds="manual"), "thresholds"),
    (dict(thresholds=[]), "thresholds"),
    (dict(thresholds=[1.0, -1.0]), "thresholds"),
    (dict(thresholds=[float("nan")]), "thresholds"),
    (dict(thresholds={"clipnorm": [1.0]}), "thresholds"),
    (dict(thresholds={"clipnorm": [1.0], "clipvalue": [1.0], "global_clipnorm": "x"}), "thresholds"),
    (dict(seed=1.5), "seed"),
    (dict(probe_steps=0), "probe_steps"),
    (dict(log_dir=""), "log_dir"),
    (dict(verbose=5), "verbose"),
])
def test_bad_arguments_are_refused_in_init(kwargs, match):
    args = dict(build_model=Builder())
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gradwatch.ClippingSweep(args.pop("build_model"), **args)


def test_validation_objective_without_validation_data_is_refused(tmp_path):
    x, y, _ = corrupted_regression()
    sweep = gradwatch.ClippingSweep(Builder(), log_dir=str(tmp_path), verbose=0)
    with pytest.raises(ValueError, match="validation_data"):
        sweep.search(x, y, epochs=1)


def test_build_model_with_its_own_clipping_is_refused(tmp_path):
    x, y, val = corrupted_regression()

    def build():
        model = Builder()()
        model.optimizer.clipnorm = 1.0
        return model

    sweep = gradwatch.ClippingSweep(build, log_dir=str(tmp_path), thresholds=[1.0], verbose=0)
    with pytest.raises(ValueError, match="already clips"):
        sweep.search(x, y, validation_data=val, epochs=1)


def test_missing_keras_tuner_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_tuner", None)
    with pytest.raises(ImportError, match=r"gradwatch\[sweep\]"):
        gradwatch.ClippingSweep(Builder())


def test_sweep_distributed_with_a_chief_and_a_worker(tmp_path):
    """KerasTuner's chief/worker mode on 127.0.0.1: the chief probes and serves
    the grid, the worker trains every trial; the chief returns the results."""
    import socket
    import subprocess

    from sweep_process import DISTRIBUTED_FIT

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    script = os.path.join(os.path.dirname(__file__), "sweep_process.py")
    env = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port),
               TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    chief = subprocess.Popen([sys.executable, script, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(env, KERASTUNER_TUNER_ID="chief"))
    worker = subprocess.Popen([sys.executable, script, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, KERASTUNER_TUNER_ID="tuner0"))
    try:
        worker_out, worker_err = worker.communicate(timeout=300)
        chief_out, chief_err = chief.communicate(timeout=120)
    finally:
        for process in (chief, worker):
            process.kill()
    assert worker.returncode == 0, worker_err[-3000:]
    assert chief.returncode == 0, chief_err[-3000:]
    assert '"trials"' not in worker_out  # a worker's search returns None: nothing printed
    document = json.loads(chief_out.strip().splitlines()[-1])
    trials = document["trials"]
    assert len(trials) == 1 + sum(len(v) for v in document["thresholds"].values())
    assert {t["mode"] for t in trials} == {None, "global_clipnorm"} and len(trials) >= 4
    assert all(t["status"] == "COMPLETED" and t["steps"] == 16 for t in trials)
    # The worker wrote each trial's gradwatch run in the shared log folder.
    for trial in trials:
        assert sorted(read_tags(trial["log_dir"])[tags.GLOBAL]) == list(range(1, 17))
    # The best trial, trained again here by the documented recipe, gives the same value.
    best = gradwatch.sweep.SweepTrial(**dict(document["best"], value=float(document["best"]["value"])))
    x, y, val = corrupted_regression()
    assert reproduce(Builder(), best, x, y, validation_data=val, **DISTRIBUTED_FIT) == \
        pytest.approx(best.value, rel=1e-6)


@SHARES_AUTO_SWEEP
def test_report_shows_the_sweep_best_first(auto_sweep, capsys):
    from gradwatch import cli

    results = auto_sweep["results"]
    assert cli.main(["report", auto_sweep["log_dir"], "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    sweep = document["sweep"]
    assert sweep["objective"] == "val_loss" and sweep["direction"] == "min"
    assert [t["trial_id"] for t in sweep["trials"]] == [t.trial_id for t in results.ranked()]
    assert sweep["best"]["trial_id"] == results.best.trial_id
    assert sweep["best"]["value"] == pytest.approx(results.best.value)
    for entry, trial in zip(sweep["trials"], results.ranked()):
        assert (entry["mode"], entry["threshold"], entry["diverged"], entry["explosions"]) == (
            trial.mode, trial.threshold, trial.diverged, trial.explosions)
        assert entry["run"] in {run["run"] for run in document["runs"]}
    assert cli.main(["report", auto_sweep["log_dir"]]) == 0
    text = capsys.readouterr().out
    table = text[text.index("clipping sweep"):text.index("best:")].splitlines()
    assert results.best.name in table[2] and "1" == table[2].split()[0]
    assert f"best: {results.recommendation()}" in text


@SHARES_AUTO_SWEEP
def test_report_sweep_is_null_elsewhere_and_a_damaged_sweep_file_warns(auto_sweep, tmp_path, capsys):
    import shutil

    from gradwatch import cli

    probe = os.path.join(auto_sweep["log_dir"], results_lib.PROBE_RUN)
    assert cli.main(["report", probe, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sweep"] is None
    copy = tmp_path / "copy"
    shutil.copytree(auto_sweep["log_dir"], copy)
    (copy / results_lib.SWEEP_FILE).write_text("{not json")
    assert cli.main(["report", str(copy), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sweep"] is None
    assert "warning: clipping sweep not read" in captured.err and len(captured.err.splitlines()) == 1


def test_trial_alerts_stay_off_the_log_unless_verbose_2(tmp_path, caplog):
    x, y, val = corrupted_regression(scale=1000.0)
    for verbose, expect_alerts in ((0, False), (2, True)):
        caplog.clear()
        results = gradwatch.ClippingSweep(
            Builder(), log_dir=str(tmp_path / str(verbose)), modes=("clipnorm",), thresholds=[100.0],
            verbose=verbose).search(x, y, validation_data=val, **FIT)
        assert sum(t.explosions for t in results.trials) > 0
        alerts = [r for r in caplog.records if hasattr(r, "gradwatch_explosion")]
        assert bool(alerts) == expect_alerts


class InterruptingBuilder(Builder):
    """Raises KeyboardInterrupt (as Ctrl-C would) in its `interrupt_at`-th call."""

    def __init__(self, interrupt_at, **builder_kwargs):
        super().__init__(**builder_kwargs)
        self.interrupt_at = interrupt_at

    def __call__(self):
        if self.calls + 1 == self.interrupt_at:
            self.calls += 1
            raise KeyboardInterrupt
        return super().__call__()


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    x, y, val = corrupted_regression()
    # Three trials (no clipping, clipnorm 0.3, clipnorm 3.0): one completed, one
    # interrupted, one never started.
    args = dict(log_dir=str(tmp_path), modes=("clipnorm",), thresholds=[0.3, 3.0], verbose=0)
    with pytest.raises(KeyboardInterrupt):
        gradwatch.ClippingSweep(InterruptingBuilder(2), **args).search(
            x, y, validation_data=val, callbacks=[keras.callbacks.TensorBoard(str(tmp_path / "ignored"))],
            **FIT)
    done = {t.trial_id: t for t in gradwatch.ClippingSweep(Builder(), **args).results().trials}
    assert sorted(done) == ["0", "1"] and done["0"].status == "COMPLETED" and done["1"].status == "RUNNING"
    build = Builder()
    results = gradwatch.ClippingSweep(build, **args).search(x, y, validation_data=val, **FIT)
    assert build.calls == 2  # the interrupted trial again, and the one never started
    assert [t.status for t in results.trials] == ["COMPLETED"] * 3
    assert results.trials[0] == done["0"]
    # Keras' TensorBoard callback was pointed at each trial's own folder.
    assert os.path.isdir(os.path.join(results.trials[0].log_dir, "validation"))
    assert not os.path.exists(tmp_path / "ignored")
    # The interrupted trial was trained again from scratch: its run holds each step once.
    assert sorted(read_tags(results.trials[1].log_dir)[tags.GLOBAL]) == list(range(1, 17))

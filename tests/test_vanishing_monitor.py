"""Vanishing and dead gradients through `GradientMonitor`: constructed runs, exact layers and steps,
log lines, TensorBoard records, `gradwatch report` and the plugin's route."""

import json
import logging
import math

import keras
import numpy as np
import pytest

import gradwatch
from gradwatch import cli, logs, tags, vanishing
from tests import helpers
from tests.test_vanishing import Reference

BATCH = 32


def sigmoid_net(depth=10):
    init = keras.initializers.RandomNormal(stddev=0.05)
    layers = [keras.layers.Dense(64, activation="sigmoid", kernel_initializer=init, name=f"s{i}")
              for i in range(depth)]
    return keras.Sequential([keras.Input((20,))] + layers + [keras.layers.Dense(1, name="out")])


def regression(steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(steps * BATCH, 20)).astype("float32")
    return x, np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]


class Gate(keras.layers.Layer):
    def build(self, shape):
        self.gate = self.add_weight(shape=(), initializer="ones", trainable=False, name="gate")

    def call(self, x):
        return x * self.gate


def gated_model():
    inputs = keras.Input((20,))
    trunk = keras.layers.Dense(32, activation="relu", name="trunk")(inputs)
    a = keras.layers.Dense(16, activation="relu", name="branch_a")(trunk)
    b = keras.layers.Dense(16, activation="relu", name="branch_b1")(trunk)
    b = Gate(name="gate")(keras.layers.Dense(16, activation="relu", name="branch_b2")(b))
    merged = keras.layers.Concatenate()([a, b])
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(merged))


class CloseGate(keras.callbacks.Callback):
    """Sets the gate to 0 before the batch `at` (counted from 0 over the whole fit)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen == self.at:
            self.model.get_layer("gate").gate.assign(0.0)
        self.seen += 1


def warnings_of(caplog):
    return [r for r in caplog.records if r.name == "gradwatch" and r.levelno == logging.WARNING]


# The tests using `sigmoid_run` run on one pytest-xdist worker (`--dist loadgroup`,
# pyproject.toml), so it trains once.
SHARES_SIGMOID_RUN = pytest.mark.xdist_group("test_vanishing_monitor.sigmoid_run")


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory):
    """A deep sigmoid net with small initial weights, its monitor, its logs and the tape norms."""
    log_dir = str(tmp_path_factory.mktemp("sigmoid"))
    keras.utils.set_random_seed(0)
    model = sigmoid_net()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = regression(120)
    monitor = gradwatch.GradientMonitor(log_dir, verbose=0)
    weights = helpers.WeightsBeforeEachStep()
    captured = []
    handler = logging.Handler()
    handler.emit = captured.append
    logging.getLogger("gradwatch").addHandler(handler)
    try:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[weights, monitor], verbose=0)
    finally:
        logging.getLogger("gradwatch").removeHandler(handler)
    tape = helpers.expected_norms_per_step(model, weights.snapshots, x, y, BATCH)
    layers = helpers.layer_objects(model, monitor.layer_paths)
    norms = np.array([[helpers.layer_norm(v, layers[p]) for p in monitor.layer_paths] for v, _ in tape])
    sizes = [sum(int(np.prod(v.shape)) for v in layers[p].trainable_variables) for p in monitor.layer_paths]
    return log_dir, monitor, norms, sizes, captured


@SHARES_SIGMOID_RUN
def test_deep_sigmoid_early_layers_are_reported_vanishing_at_the_reference_step(sigmoid_run):
    _, monitor, norms, sizes, _ = sigmoid_run
    # Independent expectation: the plain-Python reference over tf.GradientTape norms.
    reference = Reference(norms.shape[1], sizes, [False] * norms.shape[1], vanishing.VanishingConfig())
    expected = [(row + 1, kind, i) for row in range(len(norms))
                for kind, onset, i in reference.step(list(norms[row])) if onset]
    first = monitor.vanishing[0]
    assert first.kind == "vanishing" and first.epoch == 0
    assert first.step == 50  # the window: vanishing from the first step on
    assert [path for path, _ in first.layers] == ["s0", "s1", "s2", "s3", "s4"]
    assert [(first.step, "vanishing", monitor.layer_paths.index(p)) for p, _ in first.layers] == [
        e for e in expected if e[0] == first.step]
    for (path, norm), gap in zip(first.layers, first.detail):
        i = monitor.layer_paths.index(path)
        assert norm == pytest.approx(norms[first.step - 1, i], rel=1e-4)
        assert gap <= -3
    assert "out" not in {p for r in monitor.vanishing for p, _ in r.layers}


@SHARES_SIGMOID_RUN
def test_vanishing_is_logged_once_per_layer_with_the_record(sigmoid_run):
    _, monitor, _, _, captured = sigmoid_run
    lines = [r for r in captured if r.levelno == logging.WARNING]
    assert len(lines) == len(monitor.vanishing)  # one line per onset, not one per step
    assert lines[0].gradwatch_vanishing is monitor.vanishing[0]
    text = lines[0].getMessage()
    assert text.startswith("vanishing gradient in s0, s1, s2, s3, s4 at step 50 (epoch 1)")
    named = [p for r in monitor.vanishing for p, _ in r.layers]
    assert len(named) == len(set(named))  # no layer twice: none recovered


@SHARES_SIGMOID_RUN
def test_vanishing_records_go_to_tensorboard_and_the_report(sigmoid_run, capsys):
    log_dir, monitor, _, _, _ = sigmoid_run
    written = helpers.read_tags(log_dir)
    docs = [doc for step in sorted(written[tags.VANISHING]) for doc in json.loads(written[tags.VANISHING][step])]
    assert docs == [json.loads(json.dumps(r.to_json())) for r in monitor.vanishing]
    assert any("vanishing gradient in s0" in text for text in written[tags.ALERTS_TEXT].values())
    run = logs.read_logdir(log_dir)[0]
    assert [(r.step, r.kind, r.layers) for r in run.vanishing] == [
        (r.step, r.kind, tuple((p, pytest.approx(n, rel=1e-6)) for p, n in r.layers)) for r in monitor.vanishing]
    assert cli.main(["report", log_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["runs"][0]["vanishing"]
    assert report["count"] == len(monitor.vanishing)
    assert report["layers"]["vanishing"][:5] == [{"layer": f"s{i}", "first_step": 50} for i in range(5)]
    assert report["layers"]["dead"] == []
    assert cli.main(["report", log_dir]) == 0
    assert "vanishing gradients: s0 (step 50), s1 (step 50)" in capsys.readouterr().out
    assert cli.main(["report", log_dir, "--fail-on-vanishing"]) == 1
    assert "had vanishing gradients in s0, s1, s2, s3, s4" in capsys.readouterr().err


@SHARES_SIGMOID_RUN
def test_plugin_route_lists_and_marks_the_layers(sigmoid_run):
    from werkzeug.test import Client

    from tensorboard_plugin_gradwatch.tests.conftest import make_app

    log_dir, monitor, _, _, _ = sigmoid_run
    client = Client(make_app(log_dir)[0])
    response = client.get("/data/plugin/gradwatch/vanishing?run=train")
    assert response.status_code == 200
    view = json.loads(response.get_data(as_text=True))
    assert [(r["step"], r["kind"]) for r in view["records"]] == [(r.step, r.kind) for r in monitor.vanishing]
    assert view["marks"][:5] == [{"layer": f"s{i}", "kind": "vanishing", "step": 50} for i in range(5)]
    assert client.get("/data/plugin/gradwatch/vanishing").status_code == 400
    empty = json.loads(client.get("/data/plugin/gradwatch/vanishing?run=nope").get_data(as_text=True))
    assert empty == {"records": [], "marks": []}
    script = client.get("/data/plugin/gradwatch/vanishing.js")
    assert script.status_code == 200 and b"markVanishing" in script.get_data()


@pytest.mark.parametrize("update_freq", [1, 100])
def test_a_branch_gated_off_mid_run_is_dead_exactly_dead_steps_later(tmp_path, caplog, update_freq):
    caplog.set_level(logging.INFO, logger="gradwatch")
    keras.utils.set_random_seed(1)
    model = gated_model()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x, y = regression(100)
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=update_freq, verbose=0)
    closed_at = 60  # batch index: steps 61.. have no gradient in the branch
    model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, callbacks=[CloseGate(closed_at), monitor],
              verbose=0)
    assert [(r.step, r.epoch, r.kind, [p for p, _ in r.layers], r.detail) for r in monitor.vanishing] == [
        (closed_at + 50, 1, "dead", ["branch_b1", "branch_b2"], (50.0, 50.0))]
    assert [n for _, n in monitor.vanishing[0].layers] == [0.0, 0.0]
    lines = warnings_of(caplog)
    assert len(lines) == 1  # 190 more dead steps: no flood
    assert lines[0].getMessage().startswith("dead gradient in branch_b1, branch_b2 at step 110 (epoch 2)")
    assert lines[0].gradwatch_vanishing == monitor.vanishing[0]


def test_ordinary_trainings_raise_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    keras.utils.set_random_seed(2)
    tokens = keras.Input((12,), dtype="int32")
    embedded = keras.layers.Embedding(5000, 16, name="embed")(tokens)  # sparse rows
    recurrent = keras.layers.LSTM(16, name="lstm")(embedded)
    frozen = keras.layers.Dense(16, activation="relu", name="frozen", trainable=False)(recurrent)
    hidden = frozen
    for i in range(6):
        hidden = keras.layers.Dense(32, activation="relu", name=f"relu_{i}")(hidden)
    model = keras.Model(tokens, keras.layers.Dense(1, name="out")(hidden))
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    rng = np.random.default_rng(0)
    x = np.minimum(rng.zipf(1.3, size=(150 * BATCH, 12)), 5000) - 1
    y = (x < 20).mean(1, keepdims=True)
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[monitor], verbose=0)
    assert monitor.vanishing == []
    assert "frozen" not in monitor.layer_paths
    assert warnings_of(caplog) == []


def test_off_and_reset(tmp_path):
    keras.utils.set_random_seed(0)
    model = sigmoid_net()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = regression(60)
    off = gradwatch.GradientMonitor(str(tmp_path / "off"), vanishing=False, verbose=0)
    model.fit(x, y, batch_size=BATCH, callbacks=[off], verbose=0)
    assert off.vanishing == [] and off.get_config()["vanishing"] is False
    on = gradwatch.GradientMonitor(str(tmp_path / "on"), vanishing=gradwatch.VanishingConfig(window=20), verbose=0)
    model.fit(x, y, batch_size=BATCH, callbacks=[on], verbose=0)
    first = list(on.vanishing)
    assert first and first[0].step == 60 + 20  # the second fit goes on from step 61
    model.fit(x[:10 * BATCH], y[:10 * BATCH], batch_size=BATCH, callbacks=[on], verbose=0)
    assert on.vanishing == []  # a new fit() starts afresh (10 steps < the window)
    config = on.get_config()["vanishing"]
    assert config == {"orders": 3.0, "window": 20, "dead_steps": 50, "dead_chance": 1e-6}
    assert gradwatch.GradientMonitor(vanishing=config).vanishing_config == gradwatch.VanishingConfig(window=20)


@pytest.mark.parametrize("value", ["yes", 1, None, {"window": 0}, {"bogus": 1}])
def test_bad_vanishing_argument_is_named(value):
    with pytest.raises(ValueError, match="`(vanishing|window)`.*Received"):
        gradwatch.GradientMonitor(vanishing=value)


def test_plugin_view_skips_malformed_records():
    from tensorboard_plugin_gradwatch.vanishing_view import vanishing_view

    good = {"step": 5, "epoch": 0, "kind": "dead", "layers": [["a", 0.0], ["b", 0.0]]}
    view = vanishing_view([None, {"not": "a list"}, [good, {"step": "x"}, {"step": 6, "kind": "odd", "layers": []},
                                                     {"step": 7, "kind": "vanishing", "layers": [["a", math.inf], "x"]}]])
    assert [(r["step"], r["kind"]) for r in view["records"]] == [(5, "dead"), (7, "vanishing")]
    assert view["marks"] == [{"layer": "a", "kind": "dead", "step": 5}, {"layer": "b", "kind": "dead", "step": 5},
                             {"layer": "a", "kind": "vanishing", "step": 7}]


@SHARES_SIGMOID_RUN
@pytest.mark.parametrize("load_fast", ["false", "true"])
def test_dashboard_marks_and_lists_the_vanishing_layers(sigmoid_run, load_fast):
    from tensorboard_plugin_gradwatch import screenshot

    if not screenshot.chromium_available():
        pytest.skip("needs /usr/bin/chromium, /usr/bin/chromedriver and selenium")
    from selenium.webdriver.common.by import By

    log_dir, monitor, _, _, _ = sigmoid_run
    marks = len({(p, r.kind) for r in monitor.vanishing for p, _ in r.layers})
    with screenshot.tensorboard(log_dir, load_fast=load_fast) as (base, _), screenshot.chromium() as driver:
        root = screenshot.open_dashboard(driver, base)
        assert root.get_attribute("data-state") == "ready"
        assert driver.find_element(By.ID, "gw-heatmap").get_attribute("data-vanishing-marks") == str(marks)
        items = driver.find_elements(By.CSS_SELECTOR, "#gw-vanishing-list li")
        assert len(items) == len(monitor.vanishing)
        assert items[0].text.startswith("vanishing gradient at step 50: s0 (")


def test_a_branch_that_comes_back_is_logged_as_recovered(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")

    class Reopen(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 80:
                self.model.get_layer("gate").gate.assign(1.0)

    keras.utils.set_random_seed(1)
    model = gated_model()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x, y = regression(100)
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[CloseGate(10), Reopen(), monitor],
              verbose=0)
    assert [(r.step, r.kind) for r in monitor.vanishing] == [(60, "dead")]
    recovered = [r for r in caplog.records if hasattr(r, "gradwatch_recovered")]
    assert [r.levelno for r in recovered] == [logging.INFO]
    assert recovered[0].getMessage() == "gradwatch: the gradient of branch_b1, branch_b2 is no longer dead at step 81."

"""Explosions flagged at exactly their step, logged once per burst, in TensorBoard."""

import logging
import math

import keras
import numpy as np
import pytest

import gradwatch
from gradwatch import tags
from helpers import layer_norm, read_tags, regression_data, spiked_data, tape_norms

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)


def mlp():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh", name="hidden"),
                             keras.layers.Dense(1, name="out")])


def fit(tmp_path, x, y, *, learning_rate=0.0, batch_size=16, epochs=1, **monitor_args):
    model = mlp()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse",
                  steps_per_execution=monitor_args.pop("steps_per_execution", 1))
    monitor_args.setdefault("verbose", 0)
    monitor = gradwatch.GradientMonitor(str(tmp_path), **monitor_args)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0, callbacks=[monitor])
    return model, monitor


def test_absolute_threshold_flags_the_spike_step(tmp_path, caplog):
    x, y = spiked_data(steps=10, batch_size=16, spike_steps=[7])
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model, monitor = fit(tmp_path, x, y, explosion_threshold=50.0, update_freq=4)
    assert [e.step for e in monitor.explosions] == [7]
    explosion = monitor.explosions[0]
    variable_norms, expected_norm = tape_norms(model, x[96:112], y[96:112])
    expected_layers = sorted(((name, layer_norm(variable_norms, model.get_layer(name)))
                              for name in ("hidden", "out")), key=lambda pair: -pair[1])
    assert explosion.epoch == 0 and explosion.threshold == 50.0 and explosion.action == "none"
    assert explosion.global_norm == pytest.approx(expected_norm, rel=1e-5)
    assert [name for name, _ in explosion.layers] == [name for name, _ in expected_layers]
    np.testing.assert_allclose([n for _, n in explosion.layers], [n for _, n in expected_layers], rtol=1e-5)
    lines = [r for r in caplog.records if r.name == "gradwatch"]
    assert len(lines) == 1
    assert lines[0].getMessage().startswith("gradient explosion at step 7 (epoch 1): global norm ")
    assert f"> threshold 50; top layers: {expected_layers[0][0]} " in lines[0].getMessage()
    assert lines[0].gradwatch_explosion == explosion  # the record travels in `extra`


def test_nan_gradient_always_explodes_and_is_named(tmp_path, caplog):
    x, y = spiked_data(steps=6, batch_size=16, spike_steps=[], nan_steps=[4])
    caplog.set_level(logging.WARNING, logger="gradwatch")
    _, monitor = fit(tmp_path, x, y, explosion_threshold=1e9, skip_nonfinite=True)
    assert [e.step for e in monitor.explosions] == [4]  # skipped, so the weights stay finite
    assert monitor.explosions[0].action == "skipped"
    assert monitor.explosions[0].nonfinite and math.isnan(monitor.explosions[0].global_norm)
    message = caplog.records[0].getMessage()
    assert message.startswith("NaN/Inf gradient in hidden, out at step 4 (epoch 1)")


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_adaptive_threshold_catches_a_100x_spike_exactly(tmp_path, steps_per_execution):
    x, y = spiked_data(steps=96, batch_size=8, spike_steps=[83], scale=100.0)
    _, monitor = fit(tmp_path, x, y, learning_rate=0.01, batch_size=8, update_freq=10,
                     steps_per_execution=steps_per_execution)
    # The spike's update wrecks the weights, so later steps may explode too.
    assert monitor.explosions[0].step == 83
    logged = read_tags(str(tmp_path))
    assert min(logged[tags.EXPLOSION]) == 83
    assert math.isfinite(logged[tags.THRESHOLD][83])
    assert logged[tags.GLOBAL][83] > logged[tags.THRESHOLD][83] > logged[tags.GLOBAL][82]
    assert 1 not in logged[tags.THRESHOLD]  # warm-up: no threshold yet


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_healthy_training_raises_no_alarm(tmp_path, optimizer):
    x, y = regression_data(n=2048)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)])
    opt = keras.optimizers.SGD(0.01, momentum=0.9) if optimizer == "sgd_momentum" else "adam"
    model.compile(optimizer=opt, loss="mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[monitor])
    assert monitor.explosions == []


def test_a_burst_is_kept_whole_but_logged_in_a_few_lines(tmp_path, caplog):
    x, y = spiked_data(steps=40, batch_size=8, spike_steps=range(5, 35))
    caplog.set_level(logging.WARNING, logger="gradwatch")
    _, monitor = fit(tmp_path, x, y, batch_size=8, explosion_threshold=50.0, update_freq=7)
    assert [e.step for e in monitor.explosions] == list(range(5, 35))
    messages = [r.getMessage() for r in caplog.records if r.name == "gradwatch"]
    assert len(messages) == 2
    assert messages[0].startswith("gradient explosion at step 5 ")
    assert messages[1].startswith("gradient explosion burst ended: 30 exploding steps in steps 5-34")
    logged = read_tags(str(tmp_path))
    assert sorted(logged[tags.EXPLOSION]) == list(range(5, 35))
    assert "gradient explosion at step 5 " in logged[tags.ALERTS_TEXT][min(logged[tags.ALERTS_TEXT])]


def test_verbose_prints_alerts_to_the_console(tmp_path, capsys):
    x, y = spiked_data(steps=4, batch_size=16, spike_steps=[2])
    fit(tmp_path, x, y, explosion_threshold=50.0, verbose=1)
    assert "gradwatch: gradient explosion at step 2 (epoch 1)" in capsys.readouterr().out


class _DiskAtAlert(logging.Handler):
    """At each gradwatch alert: its step, and the steps whose norms are on disk by then."""

    def __init__(self, log_dir):
        super().__init__(logging.WARNING)
        self.log_dir, self.seen = log_dir, []

    def emit(self, record):
        explosion = getattr(record, "gradwatch_explosion", None)
        if explosion is not None:
            on_disk = sorted(read_tags(self.log_dir).get(tags.GLOBAL, {}))
            self.seen.append((explosion.step, on_disk))


@pytest.mark.parametrize("update_freq", [1, 3])
def test_written_rows_wait_for_a_write_but_never_for_an_alert(tmp_path, update_freq):
    """Issue 22: quiet steps are written in batches (at most `writing.FLUSH_SECONDS` late,
    all of them by `on_train_end`); when an alert is logged, every step up to the one
    that exploded is already in the event file, and alerts come in step order."""
    x, y = spiked_data(steps=20, batch_size=16, spike_steps=[7, 15])
    handler = _DiskAtAlert(str(tmp_path))
    logger = logging.getLogger("gradwatch")
    logger.addHandler(handler)
    try:
        _, monitor = fit(tmp_path, x, y, explosion_threshold=50.0, update_freq=update_freq)
    finally:
        logger.removeHandler(handler)
    assert [e.step for e in monitor.explosions] == [7, 15]
    assert [step for step, _ in handler.seen] == [7, 15]  # in step order, each at its drain
    for step, on_disk in handler.seen:
        drained = -(-step // update_freq) * update_freq  # the drain that saw it
        assert on_disk == list(range(1, drained + 1))
    logged = read_tags(str(tmp_path))
    assert sorted(logged[tags.GLOBAL]) == list(range(1, 21))  # every step after on_train_end
    assert sorted(logged[tags.EXPLOSION]) == [7, 15]

"""Issue 7: the monitor never costs a user their training run.

Start-up errors come before the first weight update; faults during training
(write errors, a removed log folder, exceptions in gradwatch's own code) are
logged once and training goes on to the same weights as without gradwatch;
interrupted runs keep every recorded step; resumed runs continue the step count.
"""

import logging
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch import alerts, clipping, logs, recorder, tags, writing
from gradwatch.summaries import EventWriter
from helpers import read_tags, regression_data

STEPS_PER_EPOCH, EPOCHS = 4, 3
TOTAL = STEPS_PER_EPOCH * EPOCHS


def make_model(compile_=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="tanh", name="hidden"),
                              keras.layers.Dense(1, name="out")])
    if compile_:
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def fit(model, callbacks, epochs=EPOCHS, **kwargs):
    x, y = regression_data(n=16 * STEPS_PER_EPOCH)
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, **kwargs)
    return model


def weights(model):
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.fixture(scope="module")
def reference_weights():
    """Final weights of the same run without gradwatch."""
    keras.utils.clear_session()
    return weights(fit(make_model(), []))


def assert_same_weights(model, expected):
    for got, want in zip(weights(model), expected):
        np.testing.assert_array_equal(got, want)


def gradwatch_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "gradwatch" and r.levelno >= logging.WARNING]


def monitor(log_dir, **kwargs):
    return gradwatch.GradientMonitor(str(log_dir), verbose=0, **kwargs)


def unhooked(model):
    return not [k for k in vars(model.optimizer) if "gradwatch" in k or k in (
        "_all_reduce_sum_gradients", "_clip_gradients", "_backend_update_step")]


class At(keras.callbacks.Callback):
    """Calls `action(model)` after the given (1-based) training steps."""

    def __init__(self, action, *steps):
        super().__init__()
        self.action, self.steps, self.done = action, set(steps), 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done in self.steps:
            self.action(self.model)


# -- start-up ---------------------------------------------------------------------


def _file_in_place(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train").write_text("a file where the run folder goes")
    return tmp_path / "logs", tmp_path / "logs" / "train"


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "logs", tmp_path / "file" / "logs" / "train"


@pytest.mark.parametrize("make_bad", [_file_in_place, _under_a_file], ids=["file-in-place", "under-a-file"])
def test_unwritable_log_dir_fails_before_the_first_update(tmp_path, make_bad):
    log_dir, named = make_bad(tmp_path)
    model = make_model()
    before = weights(model)
    with pytest.raises(ValueError, match="cannot write its logs") as raised:
        fit(model, [monitor(log_dir)])
    assert str(named) in str(raised.value)
    assert int(model.optimizer.iterations) == 0
    assert_same_weights(model, before)
    assert unhooked(model)


def test_log_dir_without_permission_fails_before_the_first_update(tmp_path, monkeypatch):
    # Tests run as root, who may write anywhere: deny the writes TensorFlow makes.
    def denied(path, *args, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, f"{path}; Permission denied")

    model = make_model()
    before = weights(model)
    callback = monitor(tmp_path / "logs")
    monkeypatch.setattr(tf.io, "TFRecordWriter", denied)
    with pytest.raises(ValueError, match="Permission denied") as raised:
        fit(model, [callback])
    assert str(tmp_path / "logs" / "train") in str(raised.value)
    assert int(model.optimizer.iterations) == 0
    assert_same_weights(model, before)
    monkeypatch.undo()
    fit(model, [callback], epochs=1)  # the same monitor works once the folder is writable
    assert sorted(read_tags(str(tmp_path / "logs"))[tags.GLOBAL]) == [1, 2, 3, 4]


def test_no_trainable_weights_is_an_error_before_training_and_leaves_nothing(tmp_path):
    model = make_model(compile_=False)
    for layer in model.layers:
        layer.trainable = False
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="no trainable weights"):
        fit(model, [monitor(tmp_path)])
    assert int(model.optimizer.iterations) == 0
    assert unhooked(model)
    assert not (tmp_path / "train").exists()  # its empty event file and folder removed


def test_uncompiled_model_is_refused_by_keras_before_training(tmp_path):
    model = make_model(compile_=False)
    with pytest.raises(ValueError, match="compile"):
        fit(model, [monitor(tmp_path)])


class BypassesTheOptimizer(keras.Model):
    """A custom `train_step` that updates the weights by hand."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x) - y))
        for v, g in zip(self.trainable_variables, tape.gradient(loss, self.trainable_variables)):
            v.assign_sub(0.01 * g)
        return {"loss": loss}


def test_custom_train_step_bypassing_the_optimizer_warns_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model = BypassesTheOptimizer()
    model.compile(optimizer="sgd", loss="mse")
    fit(model, [monitor(tmp_path, update_freq=1)])
    assert gradwatch_warnings(caplog) == [recorder.NO_GRADIENT]
    assert unhooked(model)


# -- faults during training ---------------------------------------------------------------


def test_write_errors_lose_only_those_steps(tmp_path, caplog, monkeypatch, reference_weights):
    caplog.set_level(logging.INFO, logger="gradwatch")
    original = EventWriter.write_scalars

    def disk_full_at_steps_5_to_6(self, step, values, wall_time=None):
        if step in (5, 6):
            raise OSError(28, "No space left on device")
        return original(self, step, values, wall_time)

    monkeypatch.setattr(EventWriter, "write_scalars", disk_full_at_steps_5_to_6)
    model = fit(make_model(), [monitor(tmp_path, update_freq=1)])
    (warning,) = gradwatch_warnings(caplog)
    assert "No space left on device" in warning and str(tmp_path / "train") in warning
    logged = read_tags(str(tmp_path))  # every event file valid
    assert sorted(logged[tags.GLOBAL]) == [s for s in range(1, TOTAL + 1) if s not in (5, 6)]
    assert set(logged["grad_norm/hidden"]) == set(logged[tags.GLOBAL])
    assert len(os.listdir(tmp_path / "train")) > 1  # writing went on in a new event file
    assert_same_weights(model, reference_weights)


def test_a_failing_write_mid_batch_keeps_the_rest_of_the_batch(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    original, calls = EventWriter.write_scalars, []

    def fails_once(self, step, values, wall_time=None):
        calls.append(step)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return original(self, step, values, wall_time)

    monkeypatch.setattr(EventWriter, "write_scalars", fails_once)
    fit(make_model(), [monitor(tmp_path, update_freq="epoch")])
    assert len(gradwatch_warnings(caplog)) == 1
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, TOTAL + 1))  # retried


def test_flush_errors_are_logged_once(tmp_path, caplog, monkeypatch, reference_weights):
    caplog.set_level(logging.WARNING, logger="gradwatch")

    def broken_flush(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EventWriter, "flush", broken_flush)
    model = fit(make_model(), [monitor(tmp_path, update_freq=2)])
    assert len(gradwatch_warnings(caplog)) == 1
    assert_same_weights(model, reference_weights)


@pytest.fixture
def write_every_drain(monkeypatch):
    """Queued events are written at every drain (as when each drain comes 2 s after the last)."""
    monkeypatch.setattr(writing, "FLUSH_SECONDS", 0.0)


def test_queued_events_survive_a_log_folder_removed_before_they_are_written(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    remove = At(lambda model: shutil.rmtree(tmp_path / "logs"), 3)
    fit(make_model(), [monitor(tmp_path / "logs", update_freq=1), remove])  # well under 2 s
    assert sorted(read_tags(str(tmp_path / "logs"))[tags.GLOBAL]) == list(range(1, TOTAL + 1))


def test_log_folder_removed_mid_run(tmp_path, caplog, reference_weights, write_every_drain):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    remove = At(lambda model: shutil.rmtree(tmp_path / "logs"), 3)
    model = fit(make_model(), [monitor(tmp_path / "logs", update_freq=1), remove])
    assert len(gradwatch_warnings(caplog)) == 1
    logged = read_tags(str(tmp_path / "logs"))
    assert sorted(logged[tags.GLOBAL]) == list(range(4, TOTAL + 1))  # 1-3 were removed with it
    assert tags.LAYERS in logged  # the new event file names its layers
    assert_same_weights(model, reference_weights)


def test_log_folder_unwritable_then_back(tmp_path, caplog, reference_weights, write_every_drain):
    caplog.set_level(logging.INFO, logger="gradwatch")
    log_dir = tmp_path / "logs"

    def block(model):  # a file where the folder was: nothing can be created there
        shutil.rmtree(log_dir)
        log_dir.write_text("blocked")

    model = fit(make_model(), [monitor(log_dir, update_freq=1), At(block, 3), At(lambda m: log_dir.unlink(), 6)])
    assert len(gradwatch_warnings(caplog)) == 1
    assert any("writes its logs again" in r.getMessage() for r in caplog.records)
    logged = read_tags(str(log_dir))
    assert sorted(logged[tags.GLOBAL]) == list(range(7, TOTAL + 1))
    assert_same_weights(model, reference_weights)


@pytest.mark.parametrize("target, name", [
    (recorder.Recorder, "_drain"),       # inside the recorder's guard
    (recorder.Recorder, "drain"),        # past it: the callback hooks' own guard
    (recorder.Recorder, "finish"),       # on_train_end
    (alerts.AlertLog, "feed"),
])
def test_exceptions_in_gradwatch_code_never_stop_training(tmp_path, caplog, monkeypatch, target, name,
                                                          reference_weights):
    caplog.set_level(logging.WARNING, logger="gradwatch")

    def broken(*args, **kwargs):
        raise RuntimeError("a gradwatch bug")

    monkeypatch.setattr(target, name, broken)
    model = fit(make_model(), [monitor(tmp_path, update_freq=1, explosion_threshold=1e-6)])
    bug_warnings = [m for m in gradwatch_warnings(caplog) if "a gradwatch bug" in m]
    # Once per failing hook: only `drain` is reached from several (batch end, epoch end, train end).
    assert len(bug_warnings) == (3 if name == "drain" else 1)
    assert int(model.optimizer.iterations) == TOTAL
    assert_same_weights(model, reference_weights)
    if name == "feed":  # alerts fail, the norms are still written
        assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, TOTAL + 1))


def test_hooks_never_raise_even_out_of_order(tmp_path):
    callback = monitor(tmp_path)
    callback.set_model(make_model())
    callback.on_epoch_begin(0)
    callback.on_train_batch_end(0)
    callback.on_epoch_end(0)
    callback.on_train_end()


# -- interruption and resumption -------------------------------------------------------------


def test_stop_training_flushes_every_step(tmp_path):
    def stop(model):
        model.stop_training = True

    model = fit(make_model(), [monitor(tmp_path, update_freq=100), At(stop, 6)])
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, 7))
    assert unhooked(model)


def interrupt(model):
    raise KeyboardInterrupt


def test_keyboard_interrupt_then_the_same_monitor_again(tmp_path):
    model, callback = make_model(), monitor(tmp_path, update_freq=100)
    with pytest.raises(KeyboardInterrupt):
        fit(model, [callback, At(interrupt, 6)])
    fit(model, [callback], epochs=1)  # writes the 6 steps first, then goes on
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, 11))
    assert unhooked(model)


def test_keyboard_interrupt_then_another_monitor_takes_over(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    model = make_model()
    with pytest.raises(KeyboardInterrupt):
        fit(model, [monitor(tmp_path / "a", update_freq=100), At(interrupt, 6)])
    fit(model, [monitor(tmp_path / "b")], epochs=1)
    assert sorted(read_tags(str(tmp_path / "a"))[tags.GLOBAL]) == list(range(1, 7))
    assert sorted(read_tags(str(tmp_path / "b"))[tags.GLOBAL]) == list(range(7, 11))
    assert any("still attached" in m for m in gradwatch_warnings(caplog))
    assert unhooked(model)


def test_keyboard_interrupt_at_exit_writes_every_step(tmp_path):
    # What the interpreter runs at exit (atexit) after an uncaught KeyboardInterrupt.
    model = make_model()
    with pytest.raises(KeyboardInterrupt):
        fit(model, [monitor(tmp_path, update_freq=100), At(interrupt, 6)])
    recorder._finish_open_recorders()
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, 7))
    assert unhooked(model)


def test_initial_epoch_continues_the_step_count(tmp_path):
    model, callback = make_model(), monitor(tmp_path, update_freq=1)
    fit(model, [callback], epochs=1)
    fit(model, [callback], epochs=3, initial_epoch=1)
    assert sorted(read_tags(str(tmp_path))[tags.GLOBAL]) == list(range(1, TOTAL + 1))


def test_backup_and_restore_continues_the_step_count(tmp_path, reference_weights):
    backup = str(tmp_path / "backup")
    callback = monitor(tmp_path / "logs", update_freq=1)

    def preempted(model):
        raise RuntimeError("preempted")

    with pytest.raises(RuntimeError, match="preempted"):
        fit(make_model(), [callback, keras.callbacks.BackupAndRestore(backup), At(preempted, 6)])
    # A new process: a fresh model, restored from the backup of epoch 1 (step 4).
    model = make_model()
    restore = keras.callbacks.BackupAndRestore(backup)
    fit(model, [restore, callback])
    assert int(model.optimizer.iterations) == TOTAL  # iterations were restored
    run = {r.name: r for r in logs.read_logdir(str(tmp_path / "logs"))}["train"]
    np.testing.assert_array_equal(run.global_norm.steps, np.arange(1, TOTAL + 1))
    assert_same_weights(model, reference_weights)


# -- bounded resources -------------------------------------------------------------------------------


def test_device_buffer_is_bounded_whatever_update_freq(tmp_path):
    callback = monitor(tmp_path, update_freq=10**9)
    callback.set_model(make_model())
    assert callback._capacity() <= 2 * (1024 + 1) + 16


def test_a_long_burst_is_one_fixed_size_record_and_few_lines(caplog):
    caplog.set_level(logging.WARNING, logger="gradwatch")
    from gradwatch import state

    log = alerts.AlertLog(None)
    steps = np.arange(1, 10001)
    rows = np.zeros((len(steps), state.LAYERS_START + 1))
    rows[:, state.FLAGS] = state.EXPLODED
    rows[:, state.GLOBAL] = 1e3
    records = {int(s): alerts.Explosion(int(s), 0, 1e3, 1.0, (("l", 1e3),), "none") for s in steps}
    lines = log.feed(steps, rows, records) + log.close()
    assert len(lines) == 1 + 10000 // log.summary_every + 1
    assert clipping.AUTO.window == 256  # the "auto" window is bounded too


def test_events_are_queued_until_a_flush_is_due(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(writing.time, "monotonic", lambda: now[0])
    output = writing.ReopeningWriter(EventWriter(str(tmp_path / "train")), on_new_file=lambda writer: None)
    written = lambda: sorted(read_tags(str(tmp_path)).get(tags.GLOBAL, {}))  # noqa: E731
    for step in (1, 2):
        output.write([writing.scalars_event(step, {tags.GLOBAL: 1.0})], flush=False)
    assert written() == []  # queued
    now[0] += writing.FLUSH_SECONDS
    output.write([writing.scalars_event(3, {tags.GLOBAL: 1.0})], flush=False)
    assert written() == [1, 2, 3]  # a flush was due: everything queued, in order
    output.write([writing.scalars_event(4, {tags.GLOBAL: 1.0})], flush=False)
    monkeypatch.setattr(writing, "_MAX_QUEUED", 2)
    output.write([writing.scalars_event(5, {tags.GLOBAL: 1.0})], flush=False)
    assert written() == [1, 2, 3, 4, 5]  # too many waiting
    output.write([writing.scalars_event(6, {tags.GLOBAL: 1.0})], flush=False)
    output.close()
    assert written() == [1, 2, 3, 4, 5, 6]  # close writes the rest

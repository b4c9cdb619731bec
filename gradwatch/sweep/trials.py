"""One trial of a clipping sweep, run by KerasTuner.

`SweepTuner` is a KerasTuner `GridSearch` whose `run_trial` seeds, builds,
sets the trial's clipping on the optimizer, trains with a `GradientMonitor`
(monitoring only) and a divergence stop, and reports the objective with
gradwatch's counts. KerasTuner schedules, stores, resumes and distributes the
trials; TensorBoard's `hparams` API writes each trial's HParams session.
"""

import contextlib
import copy
import logging
import math
import os
import shutil

import keras
import keras_tuner
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from gradwatch import alerts, tags
from gradwatch.sweep import results as results_lib

logger = logging.getLogger("gradwatch")


class DivergenceStop(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN/Inf and remembers the step."""

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.diverged_step = None

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.diverged_step is None:
            self.diverged_step = self.steps
            self.model.stop_training = True


def best_epoch_value(history, objective):
    """The objective's best value over the epochs of `history`, as KerasTuner
    reads it (`Objective.get_value` and `better_than`); NaN when absent."""
    best = math.nan
    epochs = len(next(iter(history.history.values()), []))
    for epoch in range(epochs):
        logs = {name: values[epoch] for name, values in history.history.items()
                if epoch < len(values)}
        if not objective.has_value(logs):
            continue
        value = float(objective.get_value(logs))
        if math.isnan(best) or (math.isfinite(value) and objective.better_than(value, best)):
            best = value
    return best


def worst_value(objective):
    """The value that ranks a diverged trial last for `objective`."""
    return math.inf if objective.direction == "min" else -math.inf


class GridOracle(keras_tuner.Oracle):
    """KerasTuner's oracle for a fixed grid: each combination once, in order.

    Which combinations are left is read from the oracle's trials (KerasTuner
    persists them), so a search interrupted mid-grid resumes where it stopped:
    KerasTuner's own `GridSearch` loses its place on reload (1.4.8 fails with
    a KeyError on the trial after an interrupted one). An interrupted trial is
    retried by KerasTuner itself (its retry queue).
    """

    def __init__(self, grid=(), **kwargs):
        super().__init__(**kwargs)
        self.grid = [dict(values) for values in grid]

    def populate_space(self, trial_id):
        taken = [trial.hyperparameters.values for trial in self.trials.values()]
        for values in self.grid:
            if values not in taken:
                return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING, "values": dict(values)}
        if self.ongoing_trials:
            return {"status": keras_tuner.engine.trial.TrialStatus.IDLE, "values": None}
        return {"status": keras_tuner.engine.trial.TrialStatus.STOPPED, "values": None}


class SweepTuner(keras_tuner.Tuner):
    """The grid of a `ClippingSweep` as a KerasTuner search (see `run_trial`)."""

    def __init__(self, sweep, oracle, **kwargs):
        self.sweep = sweep
        super().__init__(oracle=oracle, hypermodel=None, **kwargs)

    def run_trial(self, trial, *fit_args, **fit_kwargs):
        """Trains one trial; returns `{objective, diverged, explosions, steps}`."""
        mode, threshold = results_lib.trial_clipping(trial.hyperparameters.values)
        run_dir = os.path.join(self.sweep.log_dir, results_lib.trial_folder(trial.trial_id, mode, threshold))
        shutil.rmtree(run_dir, ignore_errors=True)  # a trial interrupted earlier starts afresh
        callbacks = copy.deepcopy(list(fit_kwargs.pop("callbacks", None) or []))
        for callback in callbacks:  # Keras' TensorBoard writes next to the trial's gradwatch run
            if isinstance(callback, keras.callbacks.TensorBoard):
                callback.log_dir = run_dir
        monitor = self.sweep._monitor(run_dir)
        stop = DivergenceStop()
        hparams = {results_lib.HP_MODE: mode or results_lib.NO_CLIPPING}
        if threshold is not None:
            hparams[results_lib.HP_THRESHOLD] = threshold
        callbacks += [monitor, stop, hparams_api.KerasCallback(run_dir, hparams, trial_id=trial.trial_id)]
        model = self.sweep._build(mode, threshold)
        with _alerts_kept_off_the_log(enabled=self.sweep.verbose < 2):
            history = model.fit(*fit_args, callbacks=callbacks, **fit_kwargs)
        objective = self.oracle.objective
        if not objective.has_value(history.history):
            raise keras_tuner.errors.FatalValueError(
                f"The objective {objective.name!r} is not among the metrics `fit` returned "
                f"({', '.join(sorted(history.history)) or 'none'}). Pass validation data for a "
                "`val_` objective, or name a metric the model computes.")
        value = best_epoch_value(history, objective)
        diverged = stop.diverged_step is not None or not math.isfinite(value)
        metrics = {
            objective.name: worst_value(objective) if diverged else value,
            results_lib.M_DIVERGED: float(diverged),
            results_lib.M_EXPLOSIONS: float(len(monitor.explosions)),
            results_lib.M_STEPS: float(stop.steps),
        }
        _write_trial_metrics(run_dir, metrics[objective.name], diverged, len(monitor.explosions))
        return metrics


@contextlib.contextmanager
def _alerts_kept_off_the_log(enabled):
    """A trial's alerts stay in its run (explosions also counted in the table),
    off the "gradwatch" logger; other gradwatch warnings still pass."""
    if not enabled:
        yield
        return
    quiet = alerts.MuteAlerts()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _write_trial_metrics(run_dir, value, diverged, explosions):
    """The HParams tab's metric columns of one trial (scalars in its session folder)."""
    writer = tf.summary.create_file_writer(run_dir)
    with writer.as_default():
        tf.summary.scalar(tags.SWEEP_OBJECTIVE, value, step=0)
        tf.summary.scalar(tags.SWEEP_DIVERGED, float(diverged), step=0)
        tf.summary.scalar(tags.SWEEP_EXPLOSIONS, float(explosions), step=0)
    writer.close()


def write_hparams_config(log_dir, modes, thresholds, objective):
    """The HParams experiment (columns and domains) at the sweep's root."""
    values = [value for mode in modes for value in thresholds[mode]]
    hparams = [hparams_api.HParam(results_lib.HP_MODE,
                                  hparams_api.Discrete([results_lib.NO_CLIPPING, *modes]))]
    if values:
        hparams.append(hparams_api.HParam(results_lib.HP_THRESHOLD,
                                          hparams_api.RealInterval(min(values), max(values))))
    metrics = [
        hparams_api.Metric(tags.SWEEP_OBJECTIVE, display_name=f"{objective.name} (best epoch)"),
        hparams_api.Metric(tags.SWEEP_DIVERGED, display_name="diverged"),
        hparams_api.Metric(tags.SWEEP_EXPLOSIONS, display_name="explosions"),
    ]
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default():
        hparams_api.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()

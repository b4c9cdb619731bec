"""`ClippingSweep`: "try clipvalue and clipnorm at several thresholds, keep the
best on validation", as one call, on KerasTuner."""

import json
import logging
import os
import shutil

from gradwatch import clipping, tags, validation, versions
from gradwatch.sweep import arguments
from gradwatch.sweep import results as results_lib
from gradwatch.sweep import thresholds as thresholds_lib

logger = logging.getLogger("gradwatch")


class ClippingSweep:
    """Tries clipping by value and by norm at several thresholds; keeps the best.

    The textbook procedure for exploding gradients -- "try both clipping by
    value and clipping by norm, with different thresholds, and see which
    performs best on the validation set" -- as one KerasTuner grid search:
    one trial without clipping and, for each mode, one trial per threshold.
    Every trial is seeded the same way, so trials differ in their clipping
    alone, and trains with a `gradwatch.GradientMonitor` (monitoring only)
    writing to its own run under `log_dir`: TensorBoard's HParams tab lists
    the trials, the gradwatch tab overlays their gradient norms, and
    `gradwatch report log_dir` prints the table.

    The objective is read as KerasTuner reads it: its value at the trial's best
    epoch (lowest for losses, highest for accuracies, or as an explicit
    `keras_tuner.Objective` says). A trial whose loss becomes NaN/Inf stops at
    once, is marked `diverged` and ranks last (KerasTuner records it with the
    worst possible value, so it never counts as a failed trial).

    **Reproducing a trial**: `keras.utils.set_random_seed(seed)`, `model =
    build_model()`, `model.optimizer.<mode> = threshold` (nothing for the trial
    without clipping), then `model.fit(...)` with the arguments given to
    `search` gives the same objective.

    **`thresholds="auto"`**: a probe run -- the start of the trial without
    clipping: the seeded model trained with the same `fit` arguments (without
    validation) for at most `probe_steps` steps, with a `GradientMonitor`
    under `log_dir/probe` -- measures the healthy gradient
    sizes (steps gradwatch flags as explosions are left out). Each mode's
    thresholds come from its own statistic (`global_clipnorm`: the global norm;
    `clipnorm`: the largest per-variable norm; `clipvalue`: the largest
    absolute gradient entry): a tenth of its median, its 10th percentile, its
    median and its 90th percentile -- from "clips every step" to "clips only
    outliers" (see `gradwatch.sweep.thresholds`). The values and why are
    printed, logged and written to the probe run.

    **Resuming and distributing** are KerasTuner's: calling `search` again on
    the same `log_dir` trains nothing already finished (and builds no model)
    and returns the same results; with KerasTuner's environment variables
    (`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`)
    the process whose tuner id contains "chief" runs the probe, serves the
    grid (`gradwatch.sweep.trials.GridOracle`) and returns the results, and each worker runs trials (its `search`
    returns None). All processes need the same arguments and a shared
    `log_dir`.

    Args:
        build_model: a function with no arguments returning a new compiled
            Keras model. Called after `keras.utils.set_random_seed(seed)`.
        log_dir: folder of the sweep: KerasTuner's project (`keras_tuner/`),
            the probe run, one folder per trial, the HParams experiment.
        objective: the metric to optimise, a name (`"val_loss"`) or a
            `keras_tuner.Objective`.
        modes: clipping modes to try, among `"clipvalue"`, `"clipnorm"` and
            `"global_clipnorm"`.
        thresholds: `"auto"`, a list of positive numbers (for every mode), or a
            dict `{mode: list}` with a list for each mode.
        seed: the seed set before building each trial's model (and the probe's).
        probe_steps: at most this many steps in the `"auto"` probe run.
        overwrite: start afresh, deleting a previous sweep's files in `log_dir`
            (else a previous sweep there is resumed).
        verbose: 0 silent; 1 prints the thresholds and the results table, and
            keeps the trials' alerts (explosions, vanishing) off the `"gradwatch"` logger
            (they are in each trial's run, and counted in the table); 2 lets
            them through too.

    Raises:
        gradwatch.UnsupportedBackendError: at construction, if Keras runs on
            another backend than TensorFlow (`KERAS_BACKEND=jax`, ...).

    Example:

    ```python
    def build_model():
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, "relu"),
                                  keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
        return model

    sweep = gradwatch.ClippingSweep(build_model, log_dir="logs/sweep")
    results = sweep.search(x, y, epochs=5, validation_data=(x_val, y_val))
    print(results)          # the table, best first
    results.best.mode, results.best.threshold
    ```
    """

    def __init__(self, build_model, *, log_dir="logs/clipping_sweep", objective="val_loss",
                 modes=("clipvalue", "clipnorm", "global_clipnorm"), thresholds="auto", seed=0,
                 probe_steps=200, overwrite=False, verbose=1):
        versions.check_backend()  # first: KerasTuner's Keras 3 must run on TensorFlow
        if not callable(build_model):
            raise ValueError(f"`build_model` must be a function with no arguments returning a compiled "
                             f"model. Received: build_model={build_model!r}")
        self.build_model = build_model
        self.log_dir = validation.check_log_dir(log_dir)
        self.objective = arguments.check_objective(objective)
        self.modes = arguments.check_modes(modes)
        self.thresholds = arguments.check_thresholds(thresholds, self.modes)
        self.seed = validation.check_int("seed", seed)
        self.probe_steps = validation.check_positive_int("probe_steps", probe_steps)
        self.overwrite = validation.check_optional_bool("overwrite", overwrite) or False
        self.verbose = validation.check_verbose(verbose)
        self.tuner = None

    # -- the search ---------------------------------------------------------

    def search(self, x=None, y=None, **fit_kwargs):
        """Runs the sweep; arguments as `model.fit` (validation data included).

        Returns a `SweepResults` (`.trials`, `.best`; printing it gives the
        table), or None on a distributed worker.
        """
        self._check_fit_kwargs(fit_kwargs)
        fit_args = (x,) if y is None else (x, y)
        role = arguments.role()
        if role == "worker":  # the chief's oracle hands out the trials
            self.tuner = self._tuner(grid=[], hyperparameters=None)
            self.tuner.search(*fit_args, **fit_kwargs)
            return None
        if self.overwrite:
            self._remove_previous()
            self.overwrite = False  # a later `search` resumes this one
        if results_lib.is_sweep_folder(self.log_dir):
            thresholds = self._resumed_thresholds()
        else:
            thresholds = self._new_sweep(fit_args, fit_kwargs)
        self.tuner = self._tuner(grid=self._grid(thresholds), hyperparameters=self._space(thresholds))
        self.tuner.search(*fit_args, **fit_kwargs)
        results = results_lib.read_results(self.log_dir)
        if self.verbose:
            print(results)
        return results

    def results(self):
        """The `SweepResults` stored in `log_dir` (no training)."""
        return results_lib.read_results(self.log_dir)

    def _check_fit_kwargs(self, fit_kwargs):
        if self.objective.name.startswith("val_") and not (
                fit_kwargs.get("validation_data") is not None or fit_kwargs.get("validation_split")):
            raise ValueError(f"The objective {self.objective.name!r} is a validation metric: pass "
                             "`validation_data` or `validation_split` to `search`, or choose another "
                             f"`objective`. Received: {sorted(fit_kwargs)}")

    def _new_sweep(self, fit_args, fit_kwargs):
        os.makedirs(self.log_dir, exist_ok=True)
        if self.thresholds == "auto":
            thresholds, described = self._auto_thresholds(fit_args, fit_kwargs)
        else:
            thresholds = self.thresholds
            described = {m: [{"value": v, "rule": "given"} for v in values] for m, values in thresholds.items()}
        from gradwatch.sweep import trials

        trials.write_hparams_config(self.log_dir, self.modes, thresholds, self.objective)
        settings = {"gradwatch_sweep_version": 1,
                    "objective": {"name": self.objective.name, "direction": self.objective.direction},
                    "modes": list(self.modes), "seed": self.seed,
                    "thresholds_given": self.thresholds != "auto", "thresholds": described}
        with open(os.path.join(self.log_dir, results_lib.SWEEP_FILE), "w", encoding="utf-8") as file:
            json.dump(settings, file, indent=2, allow_nan=False)
        return thresholds

    def _resumed_thresholds(self):
        settings = results_lib.read_settings(self.log_dir)
        stored = {mode: [entry["value"] for entry in entries]
                  for mode, entries in settings.get("thresholds", {}).items()}
        problems = []
        if settings["objective"]["name"] != self.objective.name:
            problems.append(f"objective {settings['objective']['name']!r}")
        if list(settings.get("modes", [])) != list(self.modes):
            problems.append(f"modes {settings.get('modes')}")
        if settings.get("seed") != self.seed:
            problems.append(f"seed {settings.get('seed')!r}")
        if self.thresholds != "auto" and stored != self.thresholds:
            problems.append(f"thresholds {stored}")
        if problems:
            raise ValueError(f"{self.log_dir!r} holds a sweep with other settings ({'; '.join(problems)}). "
                             "Use another `log_dir`, or `overwrite=True` to start afresh.")
        if self.verbose:
            print(f"Resuming the clipping sweep in {self.log_dir!r}.")
        return stored

    def _remove_previous(self):
        if not os.path.isdir(self.log_dir):
            return
        for name in os.listdir(self.log_dir):
            path = os.path.join(self.log_dir, name)
            if name in (results_lib.TUNER_PROJECT, results_lib.PROBE_RUN) or name.startswith("trial_"):
                shutil.rmtree(path, ignore_errors=True)
            elif name == results_lib.SWEEP_FILE or name.startswith("events.out.tfevents"):
                os.remove(path)

    # -- thresholds ---------------------------------------------------------

    def _auto_thresholds(self, fit_args, fit_kwargs):
        from gradwatch.sweep import probe

        probe_dir = os.path.join(self.log_dir, results_lib.PROBE_RUN)
        measured = probe.run_probe(lambda: self._build(None, None), probe_dir, self.probe_steps,
                                   fit_args, fit_kwargs)
        steps = len(measured.steps)
        thresholds, described, lines = {}, {}, []
        for mode in self.modes:
            try:
                proposed = thresholds_lib.propose(measured.statistics[mode])
            except ValueError as error:
                raise ValueError(f'thresholds="auto" cannot size {mode}: {error} Pass `thresholds` '
                                 "explicitly, or a larger `probe_steps`.") from None
            thresholds[mode] = [t.value for t in proposed]
            described[mode] = [{"value": t.value, "rule": t.rule,
                                "clipped_fraction": t.clipped_fraction} for t in proposed]
            lines += [thresholds_lib.describe(mode, t, steps) for t in proposed]
        header = (f"Clipping sweep: thresholds from a probe run of {steps} healthy steps "
                  f"({len(measured.excluded)} left out), logged in {probe_dir!r}:")
        logger.info("%s\n  %s", header, "\n  ".join(lines))
        if self.verbose:
            print(header + "\n  " + "\n  ".join(lines))
        _write_probe_summaries(measured, header, lines)
        return thresholds, described

    # -- pieces used by the trials (gradwatch.sweep.trials) -----------------

    def _space(self, thresholds):
        keras_tuner = arguments.keras_tuner_module()
        hp = keras_tuner.HyperParameters()
        hp.Choice(results_lib.HP_MODE, [results_lib.NO_CLIPPING, *self.modes], ordered=False)
        for mode in self.modes:
            with hp.conditional_scope(results_lib.HP_MODE, [mode]):
                hp.Choice(mode, [float(v) for v in thresholds[mode]], ordered=True)
        return hp

    def _grid(self, thresholds):
        """Hyperparameter values of every trial, in order: no clipping, then
        each mode's thresholds ascending."""
        grid = [{results_lib.HP_MODE: results_lib.NO_CLIPPING}]
        for mode in self.modes:
            grid += [{results_lib.HP_MODE: mode, mode: float(v)} for v in thresholds[mode]]
        return grid

    def _tuner(self, grid, hyperparameters):
        from gradwatch.sweep import trials

        oracle = trials.GridOracle(
            grid=grid, objective=self.objective, max_trials=len(grid) or None,
            hyperparameters=hyperparameters, seed=self.seed, max_retries_per_trial=0)
        return trials.SweepTuner(self, oracle, directory=self.log_dir,
                                 project_name=results_lib.TUNER_PROJECT, overwrite=False)

    def _build(self, mode, threshold):
        """The seeded, compiled model of a trial, with its clipping set."""
        import keras

        keras.utils.clear_session()
        keras.utils.set_random_seed(self.seed)
        model = self.build_model()
        optimizer = getattr(model, "optimizer", None) if isinstance(model, keras.Model) else None
        # KerasTuner re-raises its "fatal" errors (others fail one trial, then three in a row stop it).
        fatal = arguments.keras_tuner_module().errors.FatalValueError
        if optimizer is None:
            raise fatal("`build_model` must return a compiled Keras model (with an optimizer). "
                             f"Received: {model!r}")
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        own = {m: getattr(inner, m, None) for m in clipping.MODES if getattr(inner, m, None)}
        if own:
            raise fatal(f"`build_model`'s optimizer already clips ({own}): the sweep sets the "
                             "clipping of each trial itself. Compile without clipping.")
        if mode is not None:
            setattr(inner, mode, threshold)
        return model

    def _monitor(self, run_dir):
        from gradwatch.monitor import GradientMonitor

        return GradientMonitor(run_dir, verbose=0)


def _write_probe_summaries(measured, header, lines):
    """The probe's per-step statistics and the chosen thresholds, in its run."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(os.path.join(measured.log_dir, tags.TRAIN_RUN))
    with writer.as_default():
        for mode, tag in tags.SWEEP_PROBE_STATISTICS.items():
            for step, value in zip(measured.steps, measured.statistics[mode]):
                tf.summary.scalar(tag, float(value), step=int(step))
        tf.summary.text(tags.SWEEP_THRESHOLDS, header + "\n\n" + "\n".join(f"- {l}" for l in lines), step=0)
    writer.close()

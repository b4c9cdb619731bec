"""`GradientMonitor`: the Keras callback users add to `model.fit`."""

import dataclasses
import functools
import logging
import os
import sys

import keras

from gradwatch import capture_tf_keras, clipping, multiworker, runfolder, summaries, tags, validation, versions
from gradwatch.policy import StepPolicy
from gradwatch.recorder import Recorder

logger = logging.getLogger("gradwatch")

# Default of `reset_momentum` (measured: benchmarks/auto_threshold.py).
RESET_MOMENTUM = False

# "epoch" still drains the device buffer at least this often (bounded memory).
_EPOCH_DRAIN_STEPS = 1024


def _never_raises(hook):
    """Wraps a training-time hook: an exception is logged once per hook, never raised."""
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as error:  # monitoring must never stop training
            failed = self.__dict__.setdefault("_failed_hooks", set())
            if hook.__name__ not in failed:
                failed.add(hook.__name__)
                logger.warning("gradwatch: %s failed (%s: %s); training goes on.",
                               hook.__name__, type(error).__name__, error)
    return guarded


class GradientMonitor(capture_tf_keras.TfKerasCallbackCompat, keras.callbacks.Callback):
    """Records per-layer and global gradient norms of every training step.

    The norms are those of the gradient the optimizer really applies: after
    loss-scale unscaling, gradient accumulation and the cross-replica sum,
    before clipping. They are taken inside the compiled train step (also under
    XLA) and kept on the device; the callback writes them to TensorBoard.

    Args:
        log_dir: folder of the TensorBoard logs; events go to `log_dir/train`,
            the run of Keras' `TensorBoard` callback for the same `log_dir`
            (`train_1`, `train_2`, ... for a `fit()` that starts again at step 1
            where `train` already holds steps: see `gradwatch.runfolder`).
        update_freq: how often, in steps, the callback reads the recorded steps
            from the device and writes them, or `"epoch"`. Every step is
            written whatever the value: nothing is averaged or dropped; a larger
            value only batches the writing (and delays alerts by up to that
            many steps). Default 100.
        explosion_threshold: a positive number: a step explodes when its global
            norm is not below it. `None` (default): adaptive, learnt from the
            run's own healthy steps. NaN/Inf gradients always explode.
        auto_clip: `None` (monitor only), `"clipnorm"`, `"global_clipnorm"` or
            `"clipvalue"`: switch that clipping on at the first explosion,
            starting with the exploding step itself.
        clip_threshold: the clipping threshold, a positive number, or `"auto"`:
            a threshold that follows the run, recomputed every step from the
            switch on as the 25th percentile of the last 256 healthy steps'
            statistic -- each variable's norm for `"clipnorm"` (one threshold
            per variable), the global norm for `"global_clipnorm"`, the
            root-mean-square gradient entry for `"clipvalue"`
            (`clipping.AutoThreshold`).
        skip_nonfinite: skip updates whose gradient holds NaN/Inf. Defaults to
            True when `auto_clip` is set, else False.
        reset_momentum: with `auto_clip`, zero the optimizer's first-moment
            slots (SGD's momentum, Adam's `m`) at the step clipping switches
            on. Default False: on the benchmarks it changed nothing on average.
        vanishing: detect vanishing and dead gradients on the host, from the
            recorded layer norms (nothing is added to the step): `True`
            (default), `False`, or a `gradwatch.vanishing.VanishingConfig` with
            other settings. Onsets go to `monitor.vanishing` and are logged
            once per layer until it recovers.
        top_layers: how many layers an alert names.
        verbose: 0 silent, 1 or 2 print alerts to the console (they always go
            to the `"gradwatch"` logger).

    Example:

    ```python
    model.fit(x, y, epochs=5,
              callbacks=[gradwatch.GradientMonitor("logs", auto_clip="clipnorm")])
    ```
    """

    def __init__(self, log_dir="logs", *, update_freq=100, explosion_threshold=None,
                 auto_clip=None, clip_threshold=1.0, skip_nonfinite=None, reset_momentum=RESET_MOMENTUM,
                 vanishing=True,
                 top_layers=3, verbose=1):
        super().__init__()
        self.log_dir = validation.check_log_dir(log_dir)
        self.update_freq = validation.check_update_freq(update_freq)
        self.explosion_threshold = validation.check_explosion_threshold(explosion_threshold)
        self.auto_clip = validation.check_auto_clip(auto_clip)
        self.clip_threshold = validation.check_clip_threshold(clip_threshold)
        skip = validation.check_optional_bool("skip_nonfinite", skip_nonfinite)
        self.skip_nonfinite = (auto_clip is not None) if skip is None else skip
        self.reset_momentum = validation.check_bool("reset_momentum", reset_momentum)
        self.top_layers = validation.check_positive_int("top_layers", top_layers)
        self.verbose = validation.check_verbose(verbose)
        self.vanishing_config = validation.check_vanishing(vanishing)
        self.explosions, self.vanishing = [], []
        self.clipping_events = []
        self._recorder = None
        self._layer_paths = []

    @property
    def layer_paths(self):
        """Reported layers in model order (known once training has begun)."""
        if self._recorder is not None:
            return list(self._recorder.layer_paths)
        return list(self._layer_paths)

    def on_train_begin(self, logs=None):
        if self._recorder is not None:  # an earlier fit() ended abnormally (KeyboardInterrupt)
            self._recorder.finish(self._epoch)  # writes what it recorded, removes its hook
            self._recorder = None
            self._role.end()
        self.explosions, self.clipping_events, self.vanishing = [], [], []
        policy = self._policy()
        versions.check(self.model)  # UnsupportedVersionError before the first step, from fit()
        # Multi-worker: only the chief writes and logs alerts (`multiworker`).
        self._role = multiworker.WorkerRole(self.model.distribute_strategy)
        writer = _open_writer(self._run_dir())
        capture, hooked_function = self._reusable_capture(policy)
        if capture is None:  # Keras 3 or tf_keras, from the model's class
            capture = capture_tf_keras.capture_class(self.model)(
                self.model, policy, self._capacity(), return_records=self._drains_every_step())
        print_fn = _print_msg if self.verbose and self._role.chief else None
        recorder = Recorder(self, capture, writer, print_fn)
        self._role.begin()
        try:
            recorder.start(hooked_function)
        except BaseException:  # before the first step: undo, then report
            recorder.abandon()
            self._role.end()
            raise
        self._recorder = recorder
        self._epoch, self._batches_before_epoch, self._batches_at_drain = 0, 0, 0

    # The hooks below never raise (a failure is logged once): see `_never_raises`.
    @_never_raises
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    @_never_raises
    def on_train_batch_end(self, batch, logs=None):
        if self._recorder is None:
            return
        done = self._batches_before_epoch + batch + 1
        interval = self._drain_interval()
        if done - self._batches_at_drain >= interval:
            self._batches_at_drain = done
            self._recorder.drain(self._epoch)
        self._batches_in_epoch = batch + 1

    @_never_raises
    def on_epoch_end(self, epoch, logs=None):
        if self._recorder is None:
            return
        self._batches_before_epoch += getattr(self, "_batches_in_epoch", 0)
        self._batches_in_epoch = 0
        self._batches_at_drain = self._batches_before_epoch
        self._recorder.drain(epoch, flush=True)

    @_never_raises
    def on_train_end(self, logs=None):
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            recorder.finish(self._epoch)
            self._layer_paths = list(recorder.layer_paths)
            self._role.end()
            self._last_run = (recorder.capture, recorder.hooked_function, self.model.train_function)

    def _run_dir(self):
        """`log_dir/train`, or `train_1`, ... if this fit restarts at step 1 below steps
        already there (`gradwatch.runfolder`)."""
        run_dir = self._role.run_dir(os.path.join(self.log_dir, tags.TRAIN_RUN))
        if not self._role.chief:
            return run_dir
        try:
            first_step = int(self.model.optimizer.iterations.numpy()) + 1
        except Exception:  # no optimizer variable yet: a fresh one
            first_step = 1
        run_dir, warning = runfolder.run_dir_for(run_dir, first_step)
        if warning:
            logger.warning(warning)
        return run_dir

    def _reusable_capture(self, policy):
        """`(capture, traced train function)` of this monitor's previous `fit()`
        when nothing changed since (same model, optimizer, settings), so the
        next `fit()` does not retrace; else `(None, None)`."""
        last, self._last_run = getattr(self, "_last_run", None), None
        if last is None:
            return None, None
        capture, hooked_function, plain_function = last
        same = (capture.model is self.model and capture.outer is self.model.optimizer
                and capture.policy == policy and capture.capacity == self._capacity()
                and capture.ready and hooked_function is not None
                and self.model.train_function is plain_function)
        return (capture, hooked_function) if same else (None, None)

    def _drain_interval(self):
        """Steps between drains: `update_freq`, at most `_EPOCH_DRAIN_STEPS` (bounded memory)."""
        if self.update_freq == "epoch":
            return _EPOCH_DRAIN_STEPS
        return min(self.update_freq, _EPOCH_DRAIN_STEPS)

    def _policy(self):
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError("GradientMonitor needs a compiled model: call `model.compile(optimizer=...)` "
                             "before `fit()`.")
        own_mode, own_threshold = _optimizer_clipping(optimizer)
        if own_mode and self.auto_clip and own_mode != self.auto_clip:
            raise ValueError(
                f"`auto_clip={self.auto_clip!r}` conflicts with the optimizer's own "
                f"`{own_mode}={own_threshold}`: Keras allows one kind of clipping. Remove one.")
        return StepPolicy(
            explosion_threshold=self.explosion_threshold,
            clip_mode=self.auto_clip or own_mode,
            clip_threshold=own_threshold if own_mode else self.clip_threshold,
            auto=clipping.AUTO,
            auto_switch=self.auto_clip is not None and own_mode is None,
            skip_nonfinite=self.skip_nonfinite and not hasattr(optimizer, "inner_optimizer"),
            reset_momentum=self.reset_momentum and self.auto_clip is not None and own_mode is None)

    def _capacity(self):
        return 2 * (self._drain_interval() + self._steps_per_execution()) + 16

    def _drains_every_step(self):
        return self._drain_interval() == 1 and self._steps_per_execution() == 1

    def _steps_per_execution(self):
        steps_per_execution = getattr(self.model, "steps_per_execution", 1)
        if hasattr(steps_per_execution, "numpy"):  # tf_keras keeps it in a variable
            steps_per_execution = steps_per_execution.numpy()
        return int(steps_per_execution or 1)

    def get_config(self):
        return {"log_dir": self.log_dir, "update_freq": self.update_freq,
                "explosion_threshold": self.explosion_threshold, "auto_clip": self.auto_clip,
                "clip_threshold": self.clip_threshold, "skip_nonfinite": self.skip_nonfinite,
                "reset_momentum": self.reset_momentum,
                "vanishing": _vanishing_setting(self.vanishing_config),
                "top_layers": self.top_layers, "verbose": self.verbose}


def _vanishing_setting(config):
    """`vanishing=` as `get_config` gives it: a bool, or a dict of non-default settings."""
    from gradwatch.vanishing import VanishingConfig

    if config is None or config == VanishingConfig():
        return config is not None
    return dataclasses.asdict(config)


def _optimizer_clipping(optimizer):
    """`(mode, threshold)` of clipping configured on the optimizer, or (None, None)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    for mode in clipping.MODES:
        value = getattr(inner, mode, None)
        if value is not None:
            return mode, float(value)
    return None, None


def _open_writer(run_dir):
    try:
        return summaries.EventWriter(run_dir)
    except Exception as error:  # tf.errors and OSError alike
        raise ValueError(f"GradientMonitor cannot write its logs to {run_dir!r}: {error}") from error


def _print_msg(message):
    from keras.src.utils import io_utils  # Keras' console printer (respects absl logging mode)

    if io_utils.is_interactive_logging_enabled() and sys.stdout.isatty():
        message = "\n" + message  # off the line of Keras' live progress bar
    io_utils.print_msg(message)

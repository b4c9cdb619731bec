"""`GradientMonitor`: the Keras callback users add to `model.fit`."""

import dataclasses
import functools
import logging
import os
import sys

import keras

from gradwatch import capture, clipping, multiworker, runfolder, summaries, tags, validation, versions
from gradwatch.policy import StepPolicy
from gradwatch.recorder import NO_GRADIENT, Recorder

logger = logging.getLogger("gradwatch")

# Default of `reset_momentum` (measured: benchmarks/auto_threshold.py).
RESET_MOMENTUM = True

# With `culprits`, every this many steps the callback reads whether the step kept a
# batch (one scalar read), and if so drains at once, freeing the device slots.
_KEPT_CHECK_STEPS = 8

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


class GradientMonitor(capture.TfKerasCallbackCompat, keras.callbacks.Callback):
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
            (`clipping.AutoThreshold`). A `gradwatch.AutoThreshold`
            is `"auto"` with settings of its own, e.g.
            `AutoThreshold(overshoot_gain=0, update_gain=0)` turns off the
            overshoot watch (on by default: it keeps a copy of the weights
            while clipping is on, to see whether each update went too far).
            A run that explodes within its first 16 healthy steps restarts
            from the weights it had before its first step, clipped (kept in
            the same copy; `AutoThreshold(restart_steps=0)` turns it off);
            later, a switch whose previous step's norm was already building
            up rolls back to the weights kept at a quiet step at most about
            32 steps before (`AutoThreshold(rollback_steps=0)` turns it off).
        skip_nonfinite: skip updates whose gradient holds NaN/Inf. Defaults to
            True when `auto_clip` is set, else False.
        reset_momentum: with `auto_clip`, zero the optimizer's first-moment
            slots (SGD's momentum, Adam's `m`) at the step clipping switches
            on, so the updates already in the momentum do not go on after
            the switch; with `clip_threshold="auto"`, also whenever the
            clipped norms double again, and whenever the momentum carries
            the clipped run uphill -- its updates keep overshooting and
            still move the weights by over twice `update_ratio`
            (`clipping.AutoThreshold`, `clipping.carried_uphill`). Default
            True: after a learning-rate spike the momentum carried the spiked
            updates on for tens of steps (SGD+momentum, 3 models: "auto" ended
            92-8271x the best fixed threshold without the reset, 1.00-1.32x
            with it); on corrupted targets it changed nothing on average.
            On the same steps, the second-moment slots of Adam-like
            optimizers (Adam, AdamW, Nadam, Lamb, RMSprop: `v`) are scaled
            down to what clipping from the start would have let in
            (`clipping.capped_second_moments`), so unclipped steps before the
            switch (a corrupted first batch) do not go on shrinking Adam's
            updates (a CNN with 2% of its inputs x50, Adam: "auto" 3.5-3.7x
            the best fixed threshold without it, 1.08-1.14x with it; Keras 3;
            tf_keras optimizers get the first-moment reset only).
        vanishing: detect vanishing and dead gradients on the host, from the
            recorded layer norms (nothing is added to the step): `True`
            (default), `False`, or a `gradwatch.vanishing.VanishingConfig` with
            other settings. Onsets go to `monitor.vanishing` and are logged
            once per layer until it recovers.
        optimizers: which optimizers to watch. `None` (default): every
            optimizer the model holds -- `model.optimizer` and optimizers that
            are attributes of the model, as in a GAN whose `train_step` applies
            `self.d_optimizer` and `self.g_optimizer` -- of which those that
            apply gradients are recorded (the default optimizer `compile()`
            made but the step never uses is ignored). A list of optimizers,
            or a dict `{name: optimizer}`, names them explicitly (also
            optimizers the model does not hold, as in a custom training loop).
            One optimizer writes to `log_dir/train`; several each to their own
            run, `log_dir/train/<name>` (the attribute's name or the dict key),
            with their own detection and clipping; alerts then start `[name]`.
        sublayers: finer rows. 0 (default): one row per layer that is not a
            model -- a transformer block is one row, its attention,
            feed-forward layers and norms together; a layer of a nested model
            is reported as `outer/inner`. 1: each sublayer of such a layer
            has its own row (`.../transformer_layer_0/self_attention`,
            `.../feedforward_output_dense`, `.../feedforward_layer_norm`);
            2: one level further (the attention's `query`, `key`, `value`,
            `attention_output`); and so on. Rows always follow the layers
            that hold the variables, whatever their `trainable` flags: after
            keras-hub's `enable_lora`, the trainable `query` and `value`
            layers of each frozen block are rows of their own. More rows cost
            a little more per step (README, "Finer rows").
        culprits: which samples made the gradient explode
            (`gradwatch.culprits`). `False` (default): nothing is kept (healthy
            steps would pay an untaken `tf.cond`: measured +1-3% of a ~1.3 ms
            step, nothing measurable on steps of tens of ms; see the README).
            `"rank"`: the batch of an exploding step and the weights it saw
            are copied on the device inside the step, ranked on the host
            (each sample's loss and gradient norm: `Explosion.culprits`),
            held in memory (`Explosion.batch()`), and named in the alert;
            only the ranking (positions, losses, norms) is written to the logs. `True`: the same, and the kept samples' arrays
            and previews are written to the run folder too (`culprits/`).
            Per `fit()` and optimizer the batches of the first 8 exploding
            steps and of the 4 worst later ones are kept; also under XLA.
        top_layers: how many layers an alert names.
        verbose: 0 silent, 1 or 2 print alerts to the console (they always go
            to the `"gradwatch"` logger).

    Raises:
        gradwatch.UnsupportedBackendError: at construction, if Keras 3 runs on
            another backend than TensorFlow (`KERAS_BACKEND=jax`, ...), unless
            tf_keras has been imported (a tf_keras model always runs on
            TensorFlow; a Keras 3 model is then refused when `fit()` starts).
        gradwatch.UnsupportedVersionError: from `fit()`, before the first step,
            on a Keras, tf_keras or TensorFlow version gradwatch does not support.
        ValueError: an argument out of range (named in the message).

    Example:

    ```python
    model.fit(x, y, epochs=5,
              callbacks=[gradwatch.GradientMonitor("logs", auto_clip="clipnorm")])
    ```

    In a custom training loop, drive it as Keras' guide does:

    ```python
    callbacks = keras.callbacks.CallbackList(
        [gradwatch.GradientMonitor("logs", optimizers=[optimizer])], model=model)
    callbacks.on_train_begin()          # before the step function is first called
    for step, (x, y) in enumerate(dataset):
        train_step(x, y)                # a tf.function calling optimizer.apply_gradients
        callbacks.on_train_batch_end(step)
    callbacks.on_train_end()
    ```
    """

    def __init__(self, log_dir="logs", *, update_freq=100, explosion_threshold=None,
                 auto_clip=None, clip_threshold=1.0, skip_nonfinite=None, reset_momentum=RESET_MOMENTUM,
                 vanishing=True, optimizers=None, sublayers=0, culprits=False,
                 top_layers=3, verbose=1):
        # First: on JAX/PyTorch nothing below can work (`UnsupportedBackendError`).
        versions.check_backend(tf_keras_imported_ok=True)
        super().__init__()
        self.log_dir = validation.check_log_dir(log_dir)
        self.update_freq = validation.check_update_freq(update_freq)
        self.explosion_threshold = validation.check_explosion_threshold(explosion_threshold)
        self.auto_clip = validation.check_auto_clip(auto_clip)
        self.clip_threshold = validation.check_clip_threshold(clip_threshold)
        # `clip_threshold="auto"` follows `clipping.AUTO`; an `AutoThreshold` is "auto" with its own settings.
        self.auto_threshold = None
        if isinstance(self.clip_threshold, clipping.AutoThreshold):
            self.auto_threshold, self.clip_threshold = self.clip_threshold, "auto"
        skip = validation.check_optional_bool("skip_nonfinite", skip_nonfinite)
        self.skip_nonfinite = (auto_clip is not None) if skip is None else skip
        self.reset_momentum = validation.check_bool("reset_momentum", reset_momentum)
        self.top_layers = validation.check_positive_int("top_layers", top_layers)
        self.sublayers = validation.check_sublayers(sublayers)
        self.verbose = validation.check_verbose(verbose)
        self.vanishing_config = validation.check_vanishing(vanishing)
        self.optimizers = validation.check_optimizers(optimizers)
        self.culprits = validation.check_culprits(culprits)
        self.explosions, self.vanishing = [], []
        self.clipping_events = []
        self._recorders = []
        self._layer_paths = {}

    @property
    def layer_paths(self):
        """Reported layers in model order (known once training has begun); with
        several optimizers, a dict `{name: layer paths}` of those that applied gradients."""
        if self._recorders:
            paths = {r.capture.name: list(r.layer_paths) for r in self._recorders if r.used or r.layer_paths}
        else:
            paths = self._layer_paths
        if set(paths) <= {None}:
            return list(paths.get(None, []))
        return {name: layers for name, layers in paths.items() if layers}

    def on_train_begin(self, logs=None):
        versions.check_backend(self.model)  # a Keras 3 model off TensorFlow: before anything else
        if self._recorders:  # an earlier fit() ended abnormally (KeyboardInterrupt)
            self._finish_recorders()  # writes what they recorded, removes their hooks
        self.explosions, self.clipping_events, self.vanishing = [], [], []
        watched = self._watched_optimizers()
        policies = [self._policy(optimizer) for _, optimizer in watched]
        versions.check(self.model, [optimizer for _, optimizer in watched])  # before the first step, from fit()
        # Multi-worker: only the chief writes and logs alerts (`multiworker`).
        self._role = multiworker.WorkerRole(self.model.distribute_strategy)
        print_fn = _print_msg if self.verbose and self._role.chief else None
        captures, hooked_function = self._reusable_captures(watched, policies)
        several = len(watched) > 1
        recorders = []
        self._role.begin()
        try:
            for index, ((name, optimizer), policy) in enumerate(zip(watched, policies)):
                label = name if several else None
                writer = _open_writer(self._run_dir(optimizer, label))
                capture_ = captures[index] if captures else capture.capture_class(self.model)(
                    self.model, policy, self._capacity(), optimizer=optimizer, name=label,
                    sublayers=self.sublayers, return_records=not several and self._drains_every_step(),
                    keeper=self._keeper(policy))
                recorders.append(Recorder(self, capture_, writer, print_fn, name=name,
                                          report_unused=self.optimizers is not None or not several))
            for recorder in recorders:
                recorder.capture.data_sinks = [r.capture for r in recorders]
            for recorder in recorders:
                recorder.start()
            self._plain_function = self.model.train_function  # what fit() would have run
            if hooked_function is not None:  # traced by an earlier fit() of this monitor
                self.model.train_function = hooked_function
            elif _has_train_step(self.model):
                recorders[0].capture.make_train_function()  # traced with every hook
        except BaseException:  # before the first step: undo, then report
            for recorder in recorders:
                recorder.abandon()
            if recorders and recorders[0].capture.model is self.model:
                self.model.train_function = None
            self._role.end()
            raise
        self._recorders = recorders
        self._epoch, self._batches_before_epoch, self._batches_at_drain = 0, 0, 0
        self._kept_checked = 0

    def _watched_optimizers(self):
        """`[(name, optimizer)]` this fit records (`optimizers=`); raises if there is none."""
        from gradwatch.capture import optimizers

        watched = optimizers.named_optimizers(self.model, self.optimizers)
        if not watched:
            raise ValueError("GradientMonitor needs an optimizer: call `model.compile(optimizer=...)` before "
                             "`fit()`, or, in a custom training loop, name it: "
                             "`GradientMonitor(..., optimizers=[optimizer])`.")
        return watched

    def _finish_recorders(self):
        """Finishes every recorder (drain, write, unhook) and puts back the plain train function."""
        recorders, self._recorders = self._recorders, []
        for recorder in recorders:
            recorder.finish(self._epoch)
        hooked = self.model.train_function
        self.model.train_function = getattr(self, "_plain_function", None)
        self._layer_paths = {r.capture.name: list(r.layer_paths) for r in recorders if r.used}
        if len(recorders) > 1 and not any(r.used for r in recorders) and self.optimizers is None:
            logger.warning(NO_GRADIENT)
        self._role.end()
        return recorders, hooked

    # The hooks below never raise (a failure is logged once): see `_never_raises`.
    @_never_raises
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    @_never_raises
    def on_train_batch_end(self, batch, logs=None):
        if not self._recorders:
            return
        done = self._batches_before_epoch + batch + 1
        interval = self._drain_interval()
        early = bool(self.culprits) and done < interval and done & (done - 1) == 0  # 1, 2, 4, ...
        if not early and self.culprits and done - getattr(self, "_kept_checked", 0) >= _KEPT_CHECK_STEPS:
            # A batch kept on the device: read it now, which frees its slot for the next explosion.
            self._kept_checked = done
            early = any(recorder.has_kept() for recorder in self._recorders)
        if done - self._batches_at_drain >= interval or early:
            self._batches_at_drain = done
            for recorder in self._recorders:
                recorder.drain(self._epoch)
        self._batches_in_epoch = batch + 1

    @_never_raises
    def on_epoch_end(self, epoch, logs=None):
        if not self._recorders:
            return
        self._batches_before_epoch += getattr(self, "_batches_in_epoch", 0)
        self._batches_in_epoch = 0
        self._batches_at_drain = self._batches_before_epoch
        for recorder in self._recorders:
            recorder.drain(epoch, flush=True)

    @_never_raises
    def on_train_end(self, logs=None):
        if self._recorders:
            recorders, hooked = self._finish_recorders()
            self._last_run = ([r.capture for r in recorders], hooked, self.model.train_function)

    def _run_dir(self, optimizer, name):
        """`log_dir/train` (or `log_dir/train/<name>` for one of several optimizers),
        or `train_1`, ... if this fit restarts at step 1 below steps already there
        (`gradwatch.runfolder`)."""
        run = tags.TRAIN_RUN if name is None else tags.optimizer_run(name)
        run_dir = self._role.run_dir(os.path.join(self.log_dir, *run.split("/")))
        if not self._role.chief:
            return run_dir
        try:
            first_step = int(optimizer.iterations.numpy()) + 1
        except Exception:  # no optimizer variable yet: a fresh one
            first_step = 1
        run_dir, warning = runfolder.run_dir_for(run_dir, first_step)
        if warning:
            logger.warning(warning)
        return run_dir

    def _reusable_captures(self, watched, policies):
        """`(captures, traced train function)` of this monitor's previous `fit()`
        when nothing changed since (same model, optimizers, settings), so the
        next `fit()` does not retrace; else `(None, None)`."""
        last, self._last_run = getattr(self, "_last_run", None), None
        if last is None:
            return None, None
        captures, hooked_function, plain_function = last
        same = (len(captures) == len(watched) and hooked_function is not None
                and self.model.train_function is plain_function
                and all(c.model is self.model and c.outer is optimizer and c.policy == policy
                        and c.capacity == self._capacity() and c.ready
                and c.sublayers == self.sublayers
                        for c, (_, optimizer), policy in zip(captures, watched, policies)))
        return (captures, hooked_function) if same else (None, None)

    def _drain_interval(self):
        """Steps between drains: `update_freq`, at most `_EPOCH_DRAIN_STEPS` (bounded memory)."""
        if self.update_freq == "epoch":
            return _EPOCH_DRAIN_STEPS
        return min(self.update_freq, _EPOCH_DRAIN_STEPS)

    def _policy(self, optimizer):
        own_mode, own_threshold = _optimizer_clipping(optimizer)
        if own_mode and self.auto_clip and own_mode != self.auto_clip:
            raise ValueError(
                f"`auto_clip={self.auto_clip!r}` conflicts with the optimizer's own "
                f"`{own_mode}={own_threshold}`: Keras allows one kind of clipping. Remove one.")
        return StepPolicy(
            explosion_threshold=self.explosion_threshold,
            clip_mode=self.auto_clip or own_mode,
            clip_threshold=own_threshold if own_mode else self.clip_threshold,
            auto=self.auto_threshold or clipping.AUTO,
            auto_switch=self.auto_clip is not None and own_mode is None,
            skip_nonfinite=self.skip_nonfinite and not hasattr(optimizer, "inner_optimizer"),
            reset_momentum=self.reset_momentum and self.auto_clip is not None and own_mode is None)

    def _keeper(self, policy):
        """The `BatchKeeper` of a capture, or None with `culprits=False`."""
        if self.culprits is False:
            return None
        from gradwatch.culprits.keep import BatchKeeper

        if policy.decides_in_graph:  # the step's own verdict, and a norm over the worst kept (book.floor)
            return BatchKeeper(bound=0.0)
        fixed = policy.explosion_threshold
        return BatchKeeper(bound=float("inf") if fixed is None else float(fixed))

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
                **({"auto_threshold": dataclasses.asdict(self.auto_threshold)} if self.auto_threshold else {}),
                "reset_momentum": self.reset_momentum, "culprits": self.culprits,
                "vanishing": _vanishing_setting(self.vanishing_config),
                "sublayers": self.sublayers, "top_layers": self.top_layers, "verbose": self.verbose}


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


def _has_train_step(model):
    """The model is compiled: `fit()` may run its train function (a custom loop
    may use an uncompiled model, whose train function is never built)."""
    return getattr(model, "optimizer", None) is not None

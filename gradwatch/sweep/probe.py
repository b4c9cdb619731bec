"""The probe run of `thresholds="auto"`: a short unclipped, monitored training
that measures the healthy gradient sizes the thresholds are derived from.

The probe is the start of the trial without clipping: a freshly seeded model
trained with the sweep's `fit` arguments (without validation), stopped after
`steps` steps or at the end of training, with a `GradientMonitor` (so its norms are in TensorBoard
like any run's) and a tap on the optimizer's `apply` that reads, per step and
per variable, the gradient's squared L2 norm and largest absolute entry (the
gradient the optimizer applies: after loss-scale unscaling). Steps that
gradwatch flags as explosions, and steps after a NaN/Inf loss, are left out:
thresholds come from healthy steps only.
"""

import logging
import math

import keras
import numpy as np
import tensorflow as tf

from gradwatch.sweep import thresholds as thresholds_lib

logger = logging.getLogger("gradwatch")


class _GradientTap:
    """Wraps `optimizer.apply` on one optimizer instance to record per-variable
    gradient sizes on the host (`tf.numpy_function`: the probe runs without XLA)."""

    def __init__(self, optimizer):
        self.optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self.rows = {}  # step -> (sq norms, max abs)
        original = self.optimizer.apply

        def apply(grads, trainable_variables=None):
            grads = list(grads)
            dense = [tf.cast(tf.convert_to_tensor(g), tf.float32) for g in grads if g is not None]
            sq = tf.stack([tf.reduce_sum(tf.square(g)) for g in dense])
            max_abs = tf.stack([tf.reduce_max(tf.abs(g)) if g.shape.num_elements() != 0
                                else tf.constant(0.0) for g in dense])
            tf.numpy_function(self._record, [self.optimizer.iterations, sq, max_abs], [],
                              stateful=True)
            return original(grads, trainable_variables)

        self.optimizer.apply = apply

    def _record(self, iterations, sq, max_abs):
        # gradwatch's step: the iteration count after this update, from 1.
        self.rows[int(iterations) + 1] = (np.array(sq, np.float64), np.array(max_abs, np.float64))
        return []

    def remove(self):
        self.optimizer.__dict__.pop("apply", None)


class _StopAfter(keras.callbacks.Callback):
    """Stops training after `steps` batches, or at a NaN/Inf loss."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.done = 0
        self.diverged_step = None

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_step = self.done
            self.model.stop_training = True
        if self.done >= self.steps:
            self.model.stop_training = True


class ProbeResult:
    """What the probe measured: per healthy step, the statistic of each mode."""

    def __init__(self, steps, statistics, excluded, log_dir):
        self.steps = steps  # healthy step numbers (gradwatch's step convention)
        self.statistics = statistics  # {mode: array over `steps`}
        self.excluded = excluded  # steps left out (explosions, non-finite)
        self.log_dir = log_dir


def run_probe(build, log_dir, steps, fit_args, fit_kwargs):
    """Trains `build()`'s model unclipped for at most `steps` steps.

    `build` returns a freshly seeded compiled model. Returns a `ProbeResult`.
    """
    from gradwatch.monitor import GradientMonitor

    model = build()
    model.jit_compile = False  # the tap reads on the host; statistics do not depend on XLA
    monitor = GradientMonitor(log_dir, verbose=0)
    stop = _StopAfter(steps)
    kwargs = dict(fit_kwargs, verbose=0)
    for name in ("validation_data", "validation_split", "validation_freq", "validation_steps",
                 "validation_batch_size"):
        kwargs.pop(name, None)
    kwargs["callbacks"] = [monitor, stop]
    tap = _GradientTap(model.optimizer)
    try:
        model.fit(*fit_args, **kwargs)
    finally:
        tap.remove()
    exploded = {explosion.step for explosion in monitor.explosions}
    healthy = sorted(
        step for step, (sq, max_abs) in tap.rows.items()
        if step not in exploded and np.all(np.isfinite(sq)) and np.all(np.isfinite(max_abs))
        and (stop.diverged_step is None or step < stop.diverged_step))
    excluded = sorted(set(tap.rows) - set(healthy))
    if healthy:
        statistics = thresholds_lib.step_statistics(
            np.stack([tap.rows[s][0] for s in healthy]), np.stack([tap.rows[s][1] for s in healthy]))
    else:
        statistics = {mode: np.zeros(0) for mode in thresholds_lib.MODES}
    return ProbeResult(np.array(healthy, np.int64), statistics, excluded, log_dir)

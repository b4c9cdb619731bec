"""The hook on a tf_keras (Keras 2) optimizer, and the callback shim tf_keras needs.

Where the gradient is taken (tf_keras 2.16+, `tf_keras/src/optimizers/optimizer.py`):
`Optimizer.apply_gradients` all-reduces first (`aggregate_gradients`, a
cross-replica sum, also across workers under `MultiWorkerMirroredStrategy`),
then `_BaseOptimizer.apply_gradients` drops `None` gradients and calls
`_clip_gradients(grads)`, `_deduplicate_sparse_grad`, `_apply_weight_decay`
and `_internal_apply_gradients` (per-variable `_update_step`, then
`iterations += 1`). So the input of `_clip_gradients` is the aggregated,
pre-clip gradient. gradwatch wraps, on the optimizer *instance* only:

- `apply_gradients`: notes the variables of the step (trace time);
- `_clip_gradients`: replaced by gradwatch's statistics, detection and
  clipping (`KerasCapture._process`), which return the clipped gradient; a
  `clipnorm`/`clipvalue`/`global_clipnorm` of the optimizer is applied by
  gradwatch at the same point, as tf_keras would;
- `_update_step`: skipped (`tf.cond`) on a non-finite gradient when skipping
  is on; weight decay is then applied per variable inside the same branch
  (same arithmetic as tf_keras' `_apply_weight_decay`), so a skipped step
  leaves weights and slots unchanged. `iterations` still counts the step.

Legacy optimizers (`tf_keras.optimizers.legacy`): `_transform_gradients`
(after `_aggregate_gradients`; it holds the clipping) is replaced, and
`_resource_apply_dense` / `_resource_apply_sparse_duplicate_indices` are
skipped on a non-finite gradient.

Under a tf_keras `LossScaleOptimizer` the inner optimizer is hooked (it sees
unscaled, finite gradients); the outer optimizer's loss-scale state `update`
is wrapped to record the steps it skips (an overflow row, as for Keras 3).

Nothing here imports tf_keras unless the model is a tf_keras model.
"""

import sys

import tensorflow as tf

from gradwatch import state
from gradwatch.capture.keras3 import KerasCapture, _assign_if, _zero_if, momentum_slots, run_compiled_step


def is_tf_keras_model(model):
    """True for a `tf_keras.Model`; never imports tf_keras."""
    tf_keras = sys.modules.get("tf_keras")
    return tf_keras is not None and isinstance(model, tf_keras.Model)


def capture_class(model):
    """The capture adapter for `model`: tf_keras or Keras 3."""
    return TfKerasCapture if is_tf_keras_model(model) else KerasCapture


class TfKerasCallbackCompat:
    """What tf_keras' `CallbackList` asks of a callback beyond Keras 3's API.

    Mixed into `GradientMonitor` (a Keras 3 callback), so the same object works
    in `fit()` of both Keras versions.
    """

    _supports_tf_logs = False  # tf_keras converts batch logs to numbers
    _chief_worker_only = None  # runs on every worker; it decides what it writes

    def _implements_train_batch_hooks(self):
        return True

    def _implements_test_batch_hooks(self):
        return False

    def _implements_predict_batch_hooks(self):
        return False


class TfKerasCapture(KerasCapture):
    """Installs the in-graph capture on a tf_keras model's optimizer.

    Same interface and record format as `KerasCapture`, whose `prepare()`,
    `_process()` and `uninstall()` it reuses.
    """

    def make_train_function(self):
        """Has tf_keras rebuild `model.train_function` (the host reads the device
        buffer); with a `keeper`, `train_step` is wrapped (at trace time) so the
        step's batch is seen (`gradwatch.culprits.keep`)."""
        model = self.model
        if self.keeper is None:
            model.make_train_function(force=True)
            return
        train_step = model.train_step

        def train_step_seeing_data(data):
            sinks = getattr(self, "data_sinks", None) or [self]
            for sink in sinks:
                sink._current_data = data
            try:
                return train_step(data)
            finally:
                for sink in sinks:
                    sink._current_data = None

        # Under XLA the step compiled with XLA is run from a plain one that queues
        # the batch (`run_compiled_step`); tf_keras reads `jit_compile` when it traces
        # (the first call): off until `uninstall()`.
        self._jit_compile = None
        wrapper = train_step_seeing_data
        if getattr(model, "_jit_compile", None) and not model.run_eagerly and not state.is_distributed(
                model.distribute_strategy):
            wrapper = run_compiled_step(self, train_step_seeing_data)
            self._jit_compile = model._jit_compile
            model._jit_compile = False
        # tf_keras looks `model.train_step` up when the function is traced (its
        # first call): the wrapper stays on the instance until `uninstall()`.
        self._own_train_step = model.__dict__.get("train_step")
        model.__dict__["train_step"] = wrapper
        self._train_step_wrapper = wrapper
        model.make_train_function(force=True)

    def uninstall(self):
        super().uninstall()
        wrapper = getattr(self, "_train_step_wrapper", None)
        if wrapper is not None and self.model.__dict__.get("train_step") is wrapper:
            del self.model.__dict__["train_step"]
            if self._own_train_step is not None:
                self.model.__dict__["train_step"] = self._own_train_step
        self._train_step_wrapper = None
        if getattr(self, "_jit_compile", None) is not None:
            self.model._jit_compile = self._jit_compile
            self._jit_compile = None

    def install(self):
        import tf_keras

        self._check_unhooked_and_prepare()
        optimizer = self.optimizer
        # Skipping, the momentum reset and the restart all wrap the update.
        skip = self.policy.skip_nonfinite or self.policy.reset_momentum or self.policy.restarts
        if isinstance(optimizer, tf_keras.optimizers.legacy.Optimizer):
            self._wrap(optimizer, "_transform_gradients", self._on_transform_gradients)
            if skip:
                self._wrap(optimizer, "_resource_apply_dense", self._on_update)
                self._wrap(optimizer, "_resource_apply_sparse_duplicate_indices", self._on_update)
        elif hasattr(optimizer, "_clip_gradients") and hasattr(optimizer, "_update_step"):
            self._wrap(optimizer, "apply_gradients", self._on_apply_gradients)
            self._wrap(optimizer, "_clip_gradients", self._on_clip_gradients)
            if skip:
                self._decay = getattr(optimizer, "weight_decay", None) is not None
                if self._decay:
                    self._wrap(optimizer, "_apply_weight_decay", lambda original: (lambda variables: None))
                self._wrap(optimizer, "_update_step", self._on_update)
        else:
            raise ValueError(f"GradientMonitor does not support the optimizer {type(optimizer).__name__}: "
                             "use one of `tf_keras.optimizers` or `tf_keras.optimizers.legacy`.")
        loss_scale = getattr(self.outer, "_loss_scale", None)
        if self.loss_scaled and callable(getattr(loss_scale, "update", None)):
            self._wrap(loss_scale, "update", self._on_loss_scale_update)
        optimizer._gradwatch_capture = self

    # -- wrappers (run at trace time) ---------------------------------------
    def _on_apply_gradients(self, original):
        def apply_gradients(grads_and_vars, *args, **kwargs):
            grads_and_vars = list(grads_and_vars)
            self._begin_step([v for g, v in grads_and_vars if g is not None])
            return original(grads_and_vars, *args, **kwargs)
        return apply_gradients

    def _on_clip_gradients(self, original):
        def clip_gradients(grads):
            return self._process(list(grads))
        return clip_gradients

    def _on_transform_gradients(self, original):
        def transform_gradients(grads_and_vars):
            grads_and_vars = list(grads_and_vars)
            self._begin_step([v for _, v in grads_and_vars])
            new_grads = self._process([g for g, _ in grads_and_vars])
            grads_and_vars = [(g, v) for g, (_, v) in zip(new_grads, grads_and_vars)]
            for transform in self.optimizer.gradient_transformers:  # the user's own
                grads_and_vars = transform(grads_and_vars)
            return grads_and_vars
        return transform_gradients

    def _on_loss_scale_update(self, original):
        def update(grads):
            update_op, should_apply = original(grads)
            self.prepare()  # an unbuilt model has its variables by now

            def record_overflow():
                self._record_overflow()
                return tf.constant(True)
            tf.cond(should_apply, lambda: tf.constant(False), record_overflow)
            return update_op, should_apply
        return update

    def _on_update(self, original):
        def update(gradient, variable, *args, **kwargs):
            if self._restart_pred is not None:  # before the update, which then starts from them
                position = next((i for i, v in enumerate(self._current_variables) if v is variable), None)
                if position is not None:
                    copy = self.state.previous_weights[position]
                    _assign_if(variable, self._restart_pred, lambda: tf.cast(copy.read_value(), variable.dtype))
            if self._reset_pred is not None:
                slot = self._momentum_slot(variable)
                if slot is not None:
                    _zero_if(slot, self._reset_pred)
            skip = self._skip_pred
            if skip is None:
                return original(gradient, variable, *args, **kwargs)

            def apply():
                if getattr(self, "_decay", False):
                    self._decay_weight(variable)
                original(gradient, variable, *args, **kwargs)
                return tf.constant(True)

            return tf.cond(skip, lambda: tf.constant(False), apply)
        return update

    def _momentum_slot(self, variable):
        """The first-moment slot of `variable` (tf_keras: `momentums`/`_momentums`
        by variable index; legacy optimizers: the "momentum" or "m" slot), or None."""
        optimizer = self.optimizer
        if hasattr(optimizer, "get_slot_names"):  # legacy
            for name in ("momentum", "m"):
                if name in optimizer.get_slot_names():
                    return optimizer.get_slot(variable, name)
            return None
        slots = momentum_slots(optimizer)
        index = getattr(optimizer, "_index_dict", {}).get(optimizer._var_key(variable))
        return slots[index] if slots and index is not None and index < len(slots) else None

    def _decay_weight(self, variable):
        """tf_keras' `_apply_weight_decay` for one variable (deferred here so a
        skipped step does not decay the weights either)."""
        optimizer = self.optimizer
        if optimizer._use_weight_decay(variable):
            lr = tf.cast(optimizer.learning_rate, variable.dtype)
            wd = tf.cast(optimizer.weight_decay, variable.dtype)
            variable.assign_sub(variable * wd * lr)

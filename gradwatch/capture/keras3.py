"""The hook on a Keras 3 (TensorFlow backend) optimizer.

Where the gradient is taken: Keras' `apply()` unscales (loss scaling),
`_backend_apply_gradients` averages accumulated gradients and clips, then
`_backend_update_step` all-reduces across replicas (`_all_reduce_sum_gradients`)
and updates. gradwatch wraps, on the optimizer *instance* only:

- `_all_reduce_sum_gradients`: after the cross-replica sum, computes the
  statistics and records them in-graph; when the step may clip or skip, also
  detection and clipping (else the host detects), and returns the gradient;
- `_clip_gradients`: made a no-op, so Keras never clips the per-replica
  gradient; a `clipnorm`/`clipvalue`/`global_clipnorm` set on the optimizer is
  applied by gradwatch, after the sum (its norms are then pre-clip norms);
- `_distributed_tf_update_step`: skipped (`tf.cond`) on a non-finite gradient
  when skipping is on;
- under a `LossScaleOptimizer`, the outer optimizer's overflow branch, to
  record steps it skips.

`uninstall()` removes every wrapper; nothing is left in the optimizer's config.
"""

import tensorflow as tf

from gradwatch import clipping, state, stats
from gradwatch.capture.skip import DeferredWrites
from gradwatch.policy import HostDetector, unlowered_cond

_RECORD_KEY = "_gradwatch_record"


class KerasCapture:
    """Installs the in-graph capture on one optimizer of a model for one `fit()`
    (or one custom training loop).

    Args:
        model: the Keras 3 model.
        policy: a `gradwatch.policy.StepPolicy` with the detection and
            clipping settings.
        capacity: rows of the on-device ring buffer.
        return_records: the host reads every step's record: on one device the
            step then also returns it (see `make_train_function`).
        optimizer: the optimizer to watch (default `model.optimizer`).
        name: the optimizer's name in alerts and run folders (None: the only one).
        sublayers: levels of sublayers reported apart (`stats.layer_paths`).

    The reported layers are those whose variables the optimizer's step updates,
    read when the step is first traced (`_begin_step`); until then, a guess
    from the optimizer's own variables, or the model's.
    """

    def __init__(self, model, policy, capacity, return_records=False, optimizer=None, name=None,
                 keeper=None, sublayers=0):
        self.model, self.policy, self.return_records = model, policy, return_records
        # `gradwatch.culprits.keep.BatchKeeper` keeping exploding steps' batches, or None.
        self.keeper = keeper
        self.keep_failure = None  # trace time: why batches cannot be kept, if so
        self._current_data = None  # trace time: the batch `train_step` received
        self._exploded_pred = None  # trace time: in-graph detection's verdict
        self.name = name
        self.sublayers = sublayers
        self.host_detector = None if policy.decides_in_graph else HostDetector(policy)
        self.outer = optimizer if optimizer is not None else model.optimizer
        self.optimizer = getattr(self.outer, "inner_optimizer", self.outer)
        self.loss_scaled = self.optimizer is not self.outer
        self.capacity = capacity
        self.layer_paths, self.state = None, None
        self.traced = False  # the hook has run: the optimizer is reached
        self.sparse_layers = frozenset()  # trace time: layers with `IndexedSlices` gradients
        self._skip_pred = None
        self._held_writes = None  # `DeferredWrites` while skipping on one device
        self._reset_pred = None  # trace time: zero the momentum at this step (reset_momentum)
        self._restart_pred = None  # trace time: the weights go back to those kept (`AutoThreshold.restart_steps`)
        self._cap = None  # trace time: (clip mode, threshold) of this step, for the second moments
        self._installed = {}
        self.latest_record = None  # the train function's last record output, if any
        self.last_stored = None  # trace time: the record tensor `_process` appended
        self._state_in_graph = False  # trace time: a traced step already uses `state`

    @property
    def ready(self):
        return self.state is not None

    def prepare(self, variables=None):
        """Maps the optimizer's variables to layers and creates the device state.

        Done at `install()` for a built model from a guess (`_expected_variables`),
        and again when the step is first traced if its variables differ (a GAN's
        optimizer updates one network; an unbuilt model only gets its variables then).
        """
        if self.ready:
            return
        if variables is None:
            variables = self._expected_variables()
        self._prepared_ids = frozenset(id(v) for v in variables)
        self.layer_paths, self._layer_of_variable = stats.layer_paths(self.model, variables, self.sublayers)
        # The "auto" window has a column per variable of the step (in its order) or one.
        self._column_of_variable = {id(v): i for i, v in enumerate(variables)}
        auto_shape, weight_shapes = None, None
        if self.policy.is_auto:
            auto_shape = (self.policy.auto.window, self.policy.auto_columns(len(self._column_of_variable)))
            if self.policy.auto.keeps_weights:
                weight_shapes = [tuple(v.shape) for v in variables]
        with tf.init_scope():
            self.state = state.DeviceState(
                self.model.distribute_strategy, len(self.layer_paths), self.capacity,
                self.policy.initial_adaptive_state(), auto_shape, weight_shapes)
        if self.policy.clip_mode is not None and not self.policy.auto_switch:
            self.state.set_clip_state(True, float(self.policy.clip_threshold))

    # -- installation ------------------------------------------------------
    def make_train_function(self):
        """Has Keras rebuild `model.train_function` (traced with the hook).

        With `return_records`, on one device, the step also returns its record
        as an extra output, taken off the logs before any callback sees them:
        no device read for the host (~75 us on a CPU; the output costs ~30 us)."""
        model = self.model
        distributed = state.is_distributed(model.distribute_strategy)
        records = self.return_records and not distributed
        if not records and self.keeper is None:
            model.make_train_function(force=True)
            return
        train_step = model.train_step
        # Under XLA with culprits, the step compiled with XLA is run from a plain
        # `tf.function` step that copies the batch after it (`gradwatch.culprits.keep`).
        xla = self.keeper is not None and not distributed and _compiled_with_xla(model)

        def train_step_with_record(data):
            self.last_stored = None
            sinks = getattr(self, "data_sinks", None) or [self]
            for sink in sinks:  # every capture of the model (a GAN's optimizers), for `_keep_batch`
                sink._current_data = data
            try:
                logs = train_step(data)
            finally:
                for sink in sinks:
                    sink._current_data = None
            if records and isinstance(logs, dict) and self.ready:
                logs = {**logs, _RECORD_KEY: self._stored_record()}
            return logs

        step_function = run_compiled_step(self, train_step_with_record) if xla else train_step_with_record
        own = model.__dict__.get("train_step")  # a train_step set on the instance, if any
        model.__dict__["train_step"] = step_function  # read once, by the next line
        jit = model.__dict__.get("_jit_compile")
        if xla:
            model._jit_compile = False  # the step compiles its own part with XLA (above)
        try:
            model.make_train_function(force=True)
        finally:
            del model.__dict__["train_step"]
            if own is not None:
                model.__dict__["train_step"] = own
            if xla:
                model._jit_compile = jit
        keras_function = model.train_function
        if not records:
            return

        def train_function(iterator):
            logs = keras_function(iterator)
            if isinstance(logs, dict):
                self.latest_record = logs.pop(_RECORD_KEY, None)
            return logs

        model.train_function = train_function

    def _stored_record(self):
        """In-graph, at the end of the step: the appended record tensor if it is in
        this graph (not in a `tf.cond` branch, as under loss scaling), else read back."""
        stored = self.last_stored
        if stored is not None and stored.graph is tf.compat.v1.get_default_graph():
            return stored
        return self.state.latest_record()

    def take_latest_record(self):
        """The last step's record output (then forgotten), or None."""
        latest, self.latest_record = self.latest_record, None
        return latest

    def install(self):
        self._check_unhooked_and_prepare()
        self._wrap(self.optimizer, "_all_reduce_sum_gradients", self._on_all_reduced)
        self._wrap(self.optimizer, "_backend_update_step", self._on_update_step)
        self._wrap(self.optimizer, "_clip_gradients", lambda original: (lambda grads: grads))
        if self.policy.skip_nonfinite or self.policy.reset_momentum or self.policy.restarts:
            self._wrap(self.optimizer, "_distributed_tf_update_step", self._on_distributed_update)
        # Writes Keras makes before the gradient reaches gradwatch wait for the update (single device).
        self._held_writes = None
        if self.policy.skip_nonfinite and not state.is_distributed(self.model.distribute_strategy):
            self._held_writes = DeferredWrites(self.optimizer)
            # Keras decays the weights (AdamW's `weight_decay`) before the gradient reaches
            # gradwatch: the decay waits for the update, so that a skipped step skips it too.
            self._wrap(self.optimizer, "_apply_weight_decay", self._on_weight_decay)
        if self.loss_scaled:
            self._wrap(self.outer, "_stateful_handle_non_finite_grads", self._on_overflow)
        self.optimizer._gradwatch_capture = self

    def _check_unhooked_and_prepare(self):
        if getattr(self.optimizer, "_gradwatch_capture", None) is not None:
            raise RuntimeError("gradwatch is already attached to this optimizer.")
        if self.model.built and self.model.trainable_variables:
            self.prepare()

    def uninstall(self):
        for (target, name) in list(self._installed):
            target.__dict__.pop(name, None)
        self._installed.clear()
        self.optimizer.__dict__.pop("_gradwatch_capture", None)

    def _wrap(self, target, name, make_wrapper):
        original = getattr(target, name)
        target.__dict__[name] = make_wrapper(original)
        self._installed[(target, name)] = original

    # -- wrappers (run at trace time) ---------------------------------------
    def _on_update_step(self, original):
        def update_step(grads, trainable_variables, learning_rate):
            self._begin_step(list(trainable_variables))
            held = self._held_writes
            if held is None:
                return original(grads, trainable_variables, learning_rate)
            held.hold()  # released, and the writes made, by the update (`_on_distributed_update`)
            try:
                return original(grads, trainable_variables, learning_rate)
            finally:
                held.release()
                held.take()  # a step that reached no update makes none of them
        return update_step

    def _expected_variables(self):
        """Before the first trace: the variables the optimizer was built with that
        are still trainable, else the model's trainable variables."""
        built = getattr(self.optimizer, "_trainable_variables", None) if getattr(
            self.optimizer, "built", False) else None
        if built:
            return [v for v in built if getattr(v, "trainable", True)]
        return list(self.model.trainable_variables)

    def _begin_step(self, variables):
        """Trace time: the variables of this step, in gradient order. At the first
        trace, the layers are those of these variables (the guess made at install
        is replaced if it differs and no traced step uses it yet)."""
        if (self.ready and not self.traced and not self._state_in_graph
                and self._prepared_ids != frozenset(id(v) for v in variables)):
            self.state = None
        self.prepare(variables)
        self.traced = True
        self._current_variables = variables

    def _on_all_reduced(self, original):
        def all_reduce(grads_and_vars):
            reduced = list(original(grads_and_vars))
            grads = [g for g, _ in reduced]
            new_grads = self._process(grads)
            return [(g, v) for g, (_, v) in zip(new_grads, reduced)]
        return all_reduce

    def _on_weight_decay(self, original):
        def defer(variables):
            variables = list(variables)
            self._held_writes.defer(lambda: original(variables))
        return defer

    def _on_distributed_update(self, original):
        def distributed_update(distribution, grads_and_vars, learning_rate):
            if self._restart_pred is not None:  # before the update, which then starts from them
                _restore_if(distribution, self._current_variables, self.state.previous_weights, self._restart_pred)
            if self._reset_pred is not None:  # here the slots can be written under any strategy
                slots = momentum_slots(self.optimizer)
                cap = self._second_moment_cap(distribution, grads_and_vars)
                if state.is_distributed(distribution):
                    for slot in slots:
                        distribution.extended.update(state.backend_variable(slot), _zero_if, args=(self._reset_pred,),
                                                     group=False)
                    if cap is not None:
                        tf.cond(self._reset_pred, cap, lambda: tf.constant(False))
                elif slots or cap is not None:
                    # One cond for every slot and the second moments (each untaken cond, and
                    # each variable it holds, costs at every step: ~100 us a step per slot
                    # with one cond per slot on a small MLP).
                    _zero_all_if(slots, self._reset_pred, also=cap)
            skip, held = self._skip_pred, self._held_writes
            writes = []  # what Keras wrote before the verdict was known (`gradwatch.capture.skip`)
            if held is not None:
                held.release()
                writes = held.take()
            if skip is None:
                DeferredWrites.replay(writes)
                return original(distribution, grads_and_vars, learning_rate)

            def apply():
                DeferredWrites.replay(writes)
                original(distribution, grads_and_vars, learning_rate)
                return tf.constant(True)

            return tf.cond(skip, lambda: tf.constant(False), apply)
        return distributed_update

    def _second_moment_cap(self, distribution, grads_and_vars):
        """Trace time: the function that caps the second-moment slots to the
        clipped scale (`clipping.capped_second_moments`), run where the momentum
        is zeroed; None when the optimizer has none."""
        slots, decay = second_moment_slots(self.optimizer)
        if not slots or self._cap is None:
            return None
        mode, threshold = self._cap
        optimizer = self.optimizer
        # The gradient's position of each optimizer variable (here the variables are
        # the backend's, in `_current_variables` Keras'; the optimizer knows both).
        index = {optimizer._get_variable_index(v): i
                 for i, v in enumerate(getattr(self, "_current_variables", None) or [])}
        pairs = []
        for _, variable in grads_and_vars:
            position = optimizer._get_variable_index(variable)
            if position is None or position >= len(slots) or position not in index:
                return None  # not the variables this step was traced with: leave the slots as they are
            pairs.append((slots[position], index[position]))
        if threshold.shape.rank == 1:  # one threshold per variable (clipnorm)
            threshold = tf.gather(threshold, [i for _, i in pairs])

        def cap():  # read and written only on the steps that reset (a healthy step pays the untaken branch)
            capped = clipping.capped_second_moments([slot.value for slot, _ in pairs], mode, threshold,
                                                    decay, optimizer.iterations)
            for (slot, _), value in zip(pairs, capped):
                distribution.extended.update(state.backend_variable(slot), _assign, args=(tf.cast(value, slot.dtype),),
                                             group=False)
            return tf.constant(True)

        return cap

    def _on_overflow(self, original):
        def handle_non_finite():
            original()
            self._record_overflow()
        return handle_non_finite

    def _record_overflow(self):
        """In-graph: a row saying the loss-scale optimizer skipped this step."""
        self._state_in_graph = True
        row = [float("nan")] * (state.LAYERS_START + self.state.num_layers)
        row[state.FLAGS] = float(state.OVERFLOW)
        self.state.append(self.optimizer.iterations + 1, tf.constant(row))

    # -- the per-step computation -------------------------------------------
    def _layer_ids(self):
        variables = getattr(self, "_current_variables", None) or []
        unknown = len(self.layer_paths)
        return [self._layer_of_variable.get(id(v), unknown) for v in variables]

    def _process(self, grads):
        """In-graph: statistics, detection, clipping and the record of a step."""
        num_layers = len(self.layer_paths)
        layer_ids = self._layer_ids()
        if len(layer_ids) != len(grads):
            layer_ids = [num_layers] * len(grads)
        self.sparse_layers = frozenset(i for i, g in zip(layer_ids, grads) if isinstance(g, tf.IndexedSlices))
        variable_sq = stats.variable_squared_norms(grads)
        layer_sq = stats.sum_by_layer(variable_sq, layer_ids, num_layers + 1)
        global_norm = stats.global_norm(layer_sq)
        if self.policy.decides_in_graph:
            grads, head = self._decide(grads, variable_sq, global_norm, stats.is_nonfinite(layer_sq))
        else:  # nothing in the step depends on detection: the host detects and flags (`HostDetector`)
            head = [global_norm, global_norm, tf.constant(float("nan")), tf.constant(0.0), tf.constant(0.0)]
        if self.keeper is not None:
            self._keep_batch(global_norm)
        row = tf.concat([tf.stack(head), tf.sqrt(layer_sq[:num_layers])], axis=0)
        self._state_in_graph = True
        self.last_stored = self.state.append(self.optimizer.iterations + 1, row)
        return grads

    def _keep_batch(self, global_norm):
        """In-graph: the step's batch and pre-update weights kept when it explodes
        (`gradwatch.culprits.keep`). A failure is noted (`keep_failure`), never raised."""
        from gradwatch.culprits.keep import NotKept

        try:
            if state.is_distributed(self.model.distribute_strategy):
                raise NotKept("under a distribution strategy (each replica sees its share of the "
                              "batch) batches are not kept")
            if self.policy.decides_in_graph and self._exploded_pred is not None:
                verdict = self._exploded_pred
                exploded = lambda keeper: tf.logical_and(verdict, keeper.explodes(global_norm))  # noqa: E731
            else:
                exploded = lambda keeper: keeper.explodes(global_norm)  # noqa: E731
            self.keeper.keep(exploded, self.optimizer.iterations + 1, self._current_data,
                             getattr(self, "_current_variables", None) or [])
            self.keep_failure = None
        except NotKept as error:
            self.keep_failure = str(error)
        except Exception as error:  # monitoring must never stop training
            self.keep_failure = f"keeping it failed ({type(error).__name__}: {error})"

    def _decide(self, grads, variable_sq, global_norm, nonfinite):
        """In-graph: detection, clipping and skipping; `(new grads, record head)`."""
        policy = self.policy
        auto_values, columns = None, None
        if policy.is_auto:
            auto_values = clipping.auto_statistic(policy.clip_mode, grads, variable_sq)
            columns = self._auto_columns(len(grads))
            if columns is not None:  # not every variable has a gradient: to model order
                auto_values = tf.scatter_nd(columns[:, None], auto_values,
                                            [self.state.auto_window.shape[1]])
        # The overshoot watch keeps the weights of every variable of the model, in order.
        variables = getattr(self, "_current_variables", None) or []
        shapes = [tuple(v.shape) for v in getattr(self.state, "previous_weights", [])]
        whole = shapes and columns is None and len(variables) == len(grads) and \
            all(g is not None for g in grads) and shapes == [tuple(v.shape) for v in variables]
        step_result = policy.decide(self.state, global_norm, nonfinite, auto_values,
                                    list(zip(grads, variables)) if whole else None,
                                    step=self.optimizer.iterations + 1 if policy.restarts else None)
        new_grads, clipped_norm = grads, global_norm
        recorded = tf.constant(0.0)
        if policy.clip_mode is not None:
            threshold = step_result.clip_threshold
            if columns is not None:
                threshold = tf.gather(threshold, columns)
            if policy.clip_mode != "clipnorm" or threshold.shape[0] == 1:
                threshold = threshold[0]
            mode = policy.clip_mode

            def clipped_values(clipped):  # the clipped global norm, the recorded threshold
                return [_clipped_global_norm(mode, clipped, variable_sq, threshold),
                        policy.recorded_threshold(step_result.clip_threshold)]

            if not policy.auto_switch:  # the optimizer's own clipping, always on: Keras' ops, no cond
                new_grads = clipping.clip_gradients(grads, mode, threshold, True)
                clipped_norm, recorded = clipped_values(new_grads)
            else:  # one cond: before the switch none of the clipping ops run (issue 22)
                new_grads, (clipped_norm, recorded) = clipping.clip_if(
                    step_result.clip_active, grads, mode, threshold, clipped_values, (global_norm, 0.0))
        self._exploded_pred = step_result.exploded
        self._skip_pred = step_result.skip if policy.skip_nonfinite else None
        # The momentum is zeroed at the switch and, with "auto", whenever the clipped norms
        # doubled again or the updates keep overshooting while still large (the momentum is
        # carrying the run away: `clipping.AutoThreshold`, `clipping.carried_uphill`).
        self._reset_pred = (tf.reduce_any(tf.stack([step_result.switching, step_result.shrinking, step_result.uphill]))
                            if policy.reset_momentum else None)
        # A restart or a rollback: back to the weights kept (restored by the update).
        self._restart_pred = step_result.restarting if whole and policy.restarts else None
        self._cap = (policy.clip_mode, tf.cast(threshold, tf.float32)) if policy.clip_mode else None
        return new_grads, [global_norm, clipped_norm, step_result.threshold, recorded, step_result.flags]

    def _auto_columns(self, num_grads):
        """Trace time: the window column of each gradient (a constant), or None
        when they are all the model's variables in order (or the window has one column)."""
        if self.policy.clip_mode != "clipnorm":
            return None
        variables = getattr(self, "_current_variables", None) or []
        columns = self.state.auto_window.shape[1]
        ids = [self._column_of_variable.get(id(v)) for v in variables]
        if len(ids) != num_grads or None in ids:  # not the model's variables (a custom step): by position
            ids = [i % columns for i in range(num_grads)]
        if ids == list(range(columns)):
            return None
        return tf.constant(ids, tf.int32)


def _compiled_with_xla(model):
    """Keras 3 compiles the model's train step with XLA (`jit_compile`, "auto" resolved)."""
    try:
        return bool(model.jit_compile) and not model.run_eagerly
    except Exception:
        return False


def run_compiled_step(capture, step):
    """With culprits under XLA: `step` compiled with XLA, run from a plain step
    that then queues the batch it passed in with the weights the compiled step
    copied, if it exploded (`gradwatch.culprits.keep`: XLA cannot hold a batch
    whose shape is unknown at trace time). The model's own step must then be
    built without XLA (the caller's business)."""
    sinks = getattr(capture, "data_sinks", None) or [capture]
    for sink in sinks:
        if sink.keeper is not None:
            sink.keeper.batch_outside = True
    compiled = tf.function(step, jit_compile=True, reduce_retracing=True)

    def step_function(data):
        compiled.get_concrete_function(data)  # traced first: the keepers' queues exist
        keepers = [sink.keeper for sink in sinks if sink.keeper is not None and sink.keeper.ready and sink.keeper.xla]
        logs = compiled(data)
        for keeper in keepers:
            keeper.store_batch(data)
        return logs
    return step_function


def momentum_slots(optimizer):
    """The first-moment slots of a Keras optimizer: SGD's `momentums`, Adam's
    (AdamW, Nadam, RMSprop's) `_momentums`; an empty list when it has none."""
    for name in ("momentums", "_momentums"):
        slots = getattr(optimizer, name, None)
        if isinstance(slots, (list, tuple)) and slots:
            return [slot for slot in slots if slot is not None]
    return []


def second_moment_slots(optimizer):
    """`(slots, decay)`: the second-moment slots of a Keras optimizer that
    keeps a decaying average of squared gradients (Adam, AdamW, Nadam, Lamb:
    `_velocities` and `beta_2`; RMSprop: `_velocities` and `rho`), else `([], None)`."""
    slots = getattr(optimizer, "_velocities", None)
    decay = getattr(optimizer, "beta_2", getattr(optimizer, "rho", None))
    if not isinstance(slots, (list, tuple)) or not slots or not isinstance(decay, (int, float)):
        return [], None
    return list(slots), float(decay)


def _assign(slot, value):
    return slot.assign(value)


def _zero_if(slot, predicate):
    """`slot = 0` when `predicate` (`_assign_if`)."""
    return _assign_if(slot, predicate, lambda: tf.zeros_like(slot))


def _restore_if(distribution, variables, kept, predicate):
    """Each variable `=` its kept copy when `predicate` (a restart): one functional
    `If` for them all on one device (a healthy step passes it untaken); under a
    distribution strategy, each variable through `extended.update`."""
    targets = [state.backend_variable(variable) for variable in variables]
    if state.is_distributed(distribution):
        for target, copy in zip(targets, kept):
            distribution.extended.update(target, _assign_if, group=False,
                                         args=(predicate, lambda t=target, c=copy: tf.cast(c.read_value(), t.dtype)))
        return

    def restore():
        done = [target.assign(tf.cast(copy.read_value(), target.dtype)) for target, copy in zip(targets, kept)]
        with tf.control_dependencies(done):
            return tf.constant(True)
    unlowered_cond(predicate, restore, lambda: tf.constant(False))


def _assign_if(variable, predicate, value):
    """`variable = value()` when `predicate` (a `tf.cond`: the value is computed,
    and the variable written, only in the taken branch)."""
    def assign():
        variable.assign(value())
        return tf.constant(True)
    return tf.cond(predicate, assign, lambda: tf.constant(False))


def _zero_all_if(slots, predicate, also=None):
    """Every slot `= 0` when `predicate`, and `also()` run then, in one `tf.cond`."""
    def reset():
        done = [slot.assign(tf.zeros_like(slot)) for slot in slots]
        if also is not None:
            done.append(also())
        with tf.control_dependencies(done):
            return tf.constant(True)
    return tf.cond(predicate, reset, lambda: tf.constant(False))


def _clipped_global_norm(mode, clipped_grads, variable_sq, threshold):
    """The global norm of the clipped gradient (clipping on)."""
    if mode == "clipvalue":
        return tf.sqrt(tf.reduce_sum(stats.variable_squared_norms(clipped_grads)))
    if mode == "global_clipnorm":
        total = tf.reduce_sum(variable_sq)
        return tf.sqrt(total) * clipping.norm_clip_factor(total, threshold, tf.constant(True))
    factors = clipping.norm_clip_factor(variable_sq, threshold, tf.constant(True))
    return tf.sqrt(tf.reduce_sum(variable_sq * tf.square(factors)))

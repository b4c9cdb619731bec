"""Keeping the batch of an exploding step, on the device, at no cost on
healthy steps.

`BatchKeeper` holds `SLOTS` slots of `tf.Variable`s of unknown shape (no memory
until used). Inside the compiled step (`keep`), a `tf.cond` on "this step
explodes and a slot is free" copies the step's batch (`data`, as `train_step`
received it) and the values of the weights the step is about to update into
the next slot: a healthy step pays one scalar read, a comparison and the
untaken branch. The host takes the slots at each drain (`take`), which frees
them (their memory too).

Cost: the comparison is free; the untaken `tf.cond` is not quite (every
variable the branch reads or writes is visited at every step), which is why
`GradientMonitor(culprits=...)` defaults to False and the weights are copied
flattened, one variable per dtype and slot.

Which steps are kept: where detection runs in the step (`auto_clip`,
`skip_nonfinite`), exactly the exploding ones (whose norm reaches `bound`: 0
until the first few and worst few are kept, then the least bad of the worst
few, `set_floor`). Where the host detects (monitor
only, the default), the step keeps a batch when its gradient is not finite or
its global norm reaches `bound`, a variable the host sets at each drain to
`BOUND_FACTOR` times the adaptive threshold its detector will apply next (or
the fixed `explosion_threshold`); the host then keeps only those of exploding
steps. Every 8 steps the monitor reads the slot count (one scalar) and, when a
batch is waiting, drains at once: the slots free up well before `update_freq`. Until the first drain the bound is infinite (only NaN/Inf steps are
kept), which is why the monitor drains at steps 1, 2, 4, ... up to
`update_freq` when it keeps batches.

XLA (`jit_compile=True`): XLA cannot give a variable a value of another shape,
and the batch's shapes are not known when the step is traced (Keras traces with
a batch dimension of None for `tf.data` and for arrays with a partial last
batch). So under XLA the keeper is split (`batch_outside`): inside the compiled
step the weights' values go into flat buffers of a fixed size, one per dtype
and slot, allocated up front (their size is known: `XLA_SLOTS` times the
updated weights -- hence fewer slots under XLA), and `keep` returns the slot it
filled (-1 when none); the capture runs the compiled step from a plain
`tf.function` step, which then copies the batch it passed in into that slot's
variables (`store_batch`, any shape), outside the compiled cluster.

Limitations (the batch is then not kept; `Explosion.batch()` says why): a
distribution strategy (the step sees one replica's share of the batch), XLA
where the capture cannot run the compiled step itself (tf_keras, a custom
training loop), input leaves that are not dense tensors (ragged, sparse).
"""

import functools

import numpy as np
import tensorflow as tf

# Slots per drain interval: the first SLOTS exploding steps between two
# drains are kept. Each slot adds a few ops to the untaken branch of every step.
SLOTS = 4
# Under XLA the weight buffers of every slot are allocated up front (a copy of
# the updated weights per slot, on the device, for the whole fit): fewer slots.
XLA_SLOTS = 2
# The host's threshold times this is the in-step bound (well below: the
# host's threshold moves between drains).
BOUND_FACTOR = 0.5


class NotKept(Exception):
    """The step's batch cannot be kept (the message says why)."""


def _is_xla_context():
    try:
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:
        return False


def _value_of(variable):
    """In-graph: the current value of a Keras 3 or tf.Variable (never autocast)."""
    inner = getattr(variable, "_value", None)
    if isinstance(inner, tf.Variable):
        return inner.read_value()
    if isinstance(variable, tf.Variable):
        return variable.read_value()
    return tf.convert_to_tensor(variable)


class KeptBatch:
    """A batch taken from the device: `step`, `data` (NumPy, the structure
    `train_step` received) and `weights` (NumPy values of `variables` before
    the step's update)."""

    def __init__(self, step, data, weights, variables):
        self.step, self.data, self.weights, self.variables = step, data, weights, variables


class BatchKeeper:
    """The device slots of one capture (created at the first trace).

    `batch_outside`: set by the capture before the trace when it runs an
    XLA-compiled step itself and copies the batch after it (`store_batch`)."""

    def __init__(self, slots=SLOTS, bound=float("inf")):
        self.slots = slots
        self.ready = False
        self.reason = None  # why nothing can be kept, once known
        self._bound_set = float(bound)
        self._host_bound = float(bound)  # from the host's threshold (`set_bound`)
        self._floor = 0.0  # from the worst few kept so far (`set_floor`)
        self._structure = None
        self.batch_outside = False
        self.xla = False  # the slots were made for an XLA-compiled step

    # -- trace time -------------------------------------------------------------
    def keep(self, exploded, step, data, variables):
        """In-graph: keeps `data` and `variables`' values in the next free slot when
        `exploded` (a boolean tensor, or a function of this keeper giving it).
        Raises `NotKept` (at trace time) when this step cannot keep. Under XLA
        (`batch_outside`) only the weights are copied here; the caller copies
        the batch (`store_batch`)."""
        if data is None:
            raise NotKept("the train step's batch was not seen (a custom training loop)")
        xla = _is_xla_context()
        if xla and not self.batch_outside:
            raise NotKept("the step is compiled with XLA (jit_compile=True) by code gradwatch does not "
                          "run (tf_keras, a custom training loop): XLA cannot copy a batch into a variable "
                          "of another shape; compile with jit_compile=False to keep exploding batches")
        leaves = [leaf for leaf in tf.nest.flatten(data) if leaf is not None]
        for leaf in leaves:
            if not isinstance(leaf, tf.Tensor):
                raise NotKept(f"an input of the batch is a {type(leaf).__name__}, not a dense tensor")
        structure = _structure_of(data)
        variables = list(variables)
        if not self.ready:
            self._create(leaves, variables, data, xla)
        elif structure != self._structure or len(variables) != len(self._variables) or any(
                a is not b for a, b in zip(variables, self._variables)) or xla != self.xla:
            raise NotKept("the train step was traced again with another batch structure or other weights")
        if callable(exploded):
            exploded = exploded(self)
        count = self.count.read_value()
        keep = tf.logical_and(exploded, count < self.slots)
        stored_leaves = None if xla else leaves

        def store():
            branches = [functools.partial(self._store, s, step, stored_leaves, variables)
                        for s in range(self.slots)]
            if len(branches) == 1:
                return branches[0]()
            return tf.switch_case(tf.minimum(count, self.slots - 1), branches)

        return tf.cond(keep, store, lambda: tf.constant(-1, tf.int32))

    def store_batch(self, count_before, data):
        """In-graph, outside XLA, after the compiled step: copies `data` (the batch
        the step received) into the slot the step filled, if it filled one (the
        slot count, read before the step as `count_before`, went up)."""
        leaves = [leaf for leaf in tf.nest.flatten(data) if leaf is not None]
        count = self.count.read_value()
        slot = tf.where(count > count_before, count - 1, -1)

        def store():
            def into(s):
                def assign():
                    for var, leaf in zip(self._leaf_vars[s], leaves):
                        var.assign(leaf)
                    return tf.constant(True)
                return assign
            if self.slots == 1:
                return into(0)()
            return tf.switch_case(tf.clip_by_value(slot, 0, self.slots - 1), [into(s) for s in range(self.slots)])

        return tf.cond(slot >= 0, store, lambda: tf.constant(False))

    def _create(self, leaves, variables, data, xla=False):
        self.xla = xla
        if xla:
            self.slots = min(self.slots, XLA_SLOTS)
        with tf.init_scope():
            def empty(dtype):
                return tf.Variable(tf.zeros([0], dtype), shape=tf.TensorShape(None), trainable=False)

            self._leaf_vars = [[empty(leaf.dtype) for leaf in leaves] for _ in range(self.slots)]
            # The weights, flattened and concatenated per dtype: one variable per dtype and
            # slot (each variable the untaken branch holds costs a little at every step).
            # Under XLA, of their fixed size from the start (XLA keeps a variable's shape).
            self._dtypes = sorted({_dtype(v) for v in variables}, key=lambda d: d.name)
            sizes = {d: sum(_size(v) for v in variables if _dtype(v) == d) for d in self._dtypes}

            def weights(dtype):
                if not xla:
                    return empty(dtype)
                return tf.Variable(tf.zeros([sizes[dtype]], dtype), trainable=False)

            self._weight_vars = [[weights(d) for d in self._dtypes] for _ in range(self.slots)]
            self.steps = tf.Variable(tf.zeros([self.slots], tf.int64), trainable=False)
            self.count = tf.Variable(0, dtype=tf.int32, trainable=False)
            self._bound_set = max(self._host_bound, self._floor)
            self.bound = tf.Variable(self._bound_set, dtype=tf.float32, trainable=False)
        self._structure = _structure_of(data)
        self._template = tf.nest.map_structure(lambda t: t is not None, data)
        self._variables = variables
        self.ready = True

    def _store(self, slot, step, leaves, variables):
        for var, leaf in zip(self._leaf_vars[slot], leaves or []):
            var.assign(leaf)
        for var, dtype in zip(self._weight_vars[slot], self._dtypes):
            var.assign(tf.concat([tf.reshape(_value_of(w), [-1]) for w in variables if _dtype(w) == dtype], 0))
        self.steps.scatter_nd_update([[slot]], tf.reshape(tf.cast(step, tf.int64), [1]))
        self.count.assign_add(1)
        return tf.constant(slot, tf.int32)

    def explodes(self, global_norm):
        """In-graph, when the host detects: this step may explode (see the module):
        its norm reaches the bound, or is NaN/Inf. (Not `not norm < bound`:
        Grappler rewrites it to `norm >= bound`, false for NaN.)"""
        return tf.logical_or(tf.logical_not(tf.math.is_finite(global_norm)),
                             global_norm >= self.bound.read_value())

    # -- host -----------------------------------------------------------------------
    def _unflatten(self, flats):
        """The per-variable arrays of the per-dtype flat snapshots."""
        offsets = {dtype: 0 for dtype in self._dtypes}
        by_dtype = dict(zip(self._dtypes, flats))
        weights = []
        for variable in self._variables:
            shape = tuple(int(d) for d in variable.shape)
            size = int(np.prod(shape)) if shape else 1
            dtype = _dtype(variable)
            start = offsets[dtype]
            weights.append(np.array(by_dtype[dtype][start:start + size]).reshape(shape))
            offsets[dtype] = start + size
        return weights

    def set_bound(self, value):
        """Host: the bound from the host detector's threshold (see the module)."""
        self._host_bound = float(value)
        self._apply_bound()

    def set_floor(self, value):
        """Host: the norm a step must reach to be worth keeping once the first few
        and the worst few are kept (`gradwatch.culprits.book`); 0 until then."""
        self._floor = float(value)
        self._apply_bound()

    def _apply_bound(self):
        value = max(self._host_bound, self._floor)
        if self.ready and value != self._bound_set:
            self.bound.assign(value)
            self._bound_set = value

    def take(self):
        """Host: the kept batches (then the slots are freed); one scalar read when none."""
        if not self.ready:
            return []
        count = int(self.count.numpy())
        if count == 0:
            return []
        steps = self.steps.numpy()
        kept = []
        for slot in range(min(count, self.slots)):
            leaves = [np.array(v.numpy()) for v in self._leaf_vars[slot]]
            weights = self._unflatten([v.numpy() for v in self._weight_vars[slot]])
            data = _pack(self._template, leaves)
            kept.append(KeptBatch(int(steps[slot]), data, weights, self._variables))
            for var in self._leaf_vars[slot] + ([] if self.xla else self._weight_vars[slot]):
                var.assign(tf.zeros([0], var.dtype))
        self.count.assign(0)
        return kept


def _dtype(variable):
    return tf.as_dtype(variable.dtype)  # Keras 3 variables give a string


def _size(variable):
    return int(np.prod([int(d) for d in variable.shape]))


def _structure_of(data):
    return tf.nest.map_structure(lambda t: None if t is None else (t.dtype, t.shape.rank), data)


def _pack(template, leaves):
    """The kept structure with its arrays (None where the batch had None)."""
    leaves = iter(leaves)
    return tf.nest.pack_sequence_as(
        template, [next(leaves) if present else None for present in tf.nest.flatten(template)])

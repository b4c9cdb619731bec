"""Keeping the batch of an exploding step, on the device, at no cost on
healthy steps.

`BatchKeeper` holds a `tf.queue.FIFOQueue` of `SLOTS` elements (no memory until
used). Inside the compiled step (`keep`), a `tf.cond` on "this step explodes and
the queue has room" enqueues the step number, the step's batch (`data`, as
`train_step` received it, any shapes) and the values of the weights the step is
about to update. A healthy step pays a comparison, the queue's size and the
untaken branch. The host dequeues them at each drain (`take`), which frees
their memory.

Cost: the comparison is free; an untaken `tf.cond` is not quite, as the lowered
cond visits every input and every op of its dead branch at every step. Hence
one queue (one handle, one enqueue op, no switch between slots) rather than a
variable per slot, leaf and dtype: measured on a step of 8 Dense(64) layers
(16 weight variables, ~1.3 ms of CPU), the earlier per-slot variables cost
about +5% (1.043-1.077 against a control of 0.990-1.021), the queue about +1%
(1.013, within the control's noise): benchmarks/README.md.

Which steps are kept: where detection runs in the step (`auto_clip`,
`skip_nonfinite`), the exploding ones (whose norm also reaches `bound`: 0 until
the first few and the worst few are kept, then the least bad of the worst few:
`set_floor`, `gradwatch.culprits.book`). Where the host detects (monitor only,
the default), the step keeps a batch when its gradient is not finite or its
global norm reaches `bound`, a variable the host sets at each drain to
`BOUND_FACTOR` times the adaptive threshold its detector will apply next (or
the fixed `explosion_threshold`), or the floor if higher; the host then keeps
only those of exploding steps. Every 8 steps the monitor reads the queue's
size (one scalar) and, when a batch is waiting, drains at once: the slots free
up well before `update_freq`. Until the first drain the bound is infinite
(only NaN/Inf steps are kept), which is why the monitor drains at steps 1, 2,
4, ... up to `update_freq` when it keeps batches.

XLA (`jit_compile=True`): queues do not compile with XLA, XLA cannot give a
variable a value of another shape, and the batch's shapes are not known when
the step is traced (Keras traces with a batch dimension of None for `tf.data`
and for arrays with a partial last batch). So under XLA the keeper is split
(`batch_outside`): inside the compiled step the weights' values go into flat
buffers of a fixed size, one per dtype, allocated up front (one copy of the
updated weights, for the whole fit), and `pending` gets the step number; the
capture runs the compiled step from a plain `tf.function` step, which then
enqueues the step, the batch it passed in and the buffers (`store_batch`),
outside the compiled cluster.

Limitations (the batch is then not kept; `Explosion.batch()` says why): a
distribution strategy (the step sees one replica's share of the batch), XLA
where the capture does not run the compiled step itself (a custom training
loop), input leaves that are not dense tensors (ragged, sparse).
"""

import numpy as np
import tensorflow as tf

from gradwatch.state import variable_value

# Batches held on the device between two drains: the first SLOTS exploding
# steps between two drains are kept.
SLOTS = 4
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


class KeptBatch:
    """A batch taken from the device: `step`, `data` (NumPy, the structure
    `train_step` received) and `weights` (NumPy values of `variables` before
    the step's update)."""

    def __init__(self, step, data, weights, variables):
        self.step, self.data, self.weights, self.variables = step, data, weights, variables


class BatchKeeper:
    """The device side of one capture (created at the first trace).

    `batch_outside`: set by the capture before the trace when it runs an
    XLA-compiled step itself and enqueues the batch after it (`store_batch`)."""

    def __init__(self, slots=SLOTS, bound=float("inf")):
        self.slots = slots
        self.ready = False
        self._host_bound = float(bound)  # from the host's threshold (`set_bound`)
        self._floor = 0.0  # from the worst few kept so far (`set_floor`)
        self._bound_set = None
        self._structure = None
        self.batch_outside = False
        self.xla = False  # made for an XLA-compiled step (see the module)

    # -- trace time -------------------------------------------------------------
    def keep(self, exploded, step, data, variables):
        """In-graph: keeps `data` and `variables`' values when `exploded` (a
        boolean tensor, or a function of this keeper giving it) and a slot is
        free. Raises `NotKept` (at trace time) when this step cannot keep. Under
        XLA (`batch_outside`) only the weights are copied here, into fixed
        buffers; the caller enqueues them with the batch (`store_batch`)."""
        if data is None:
            raise NotKept("the train step's batch was not seen (a custom training loop)")
        xla = _is_xla_context()
        if xla and not self.batch_outside:
            raise NotKept("the step is compiled with XLA (jit_compile=True) by code gradwatch does not "
                          "run (a custom training loop): XLA cannot copy a batch into a variable "
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
        step = tf.cast(step, tf.int64)
        if xla:
            def copy():
                for buffer, dtype in zip(self._buffers, self._dtypes):
                    buffer.assign(_flat(variables, dtype))
                self.pending.assign(step)
                return tf.constant(True)

            return tf.cond(exploded, copy, lambda: tf.constant(False))

        def enqueue():
            self._queue.enqueue([step] + leaves + [variable_value(w) for w in variables])
            return tf.constant(True)

        return tf.cond(tf.logical_and(exploded, self._queue.size() < self.slots), enqueue,
                       lambda: tf.constant(False))

    def store_batch(self, data):
        """In-graph, outside XLA, after the compiled step: when it copied the
        weights (`pending`), enqueues them with `data` (the batch the step received)."""
        leaves = [leaf for leaf in tf.nest.flatten(data) if leaf is not None]

        def enqueue():
            def put():
                self._queue.enqueue([self.pending.read_value()] + leaves
                                    + [buffer.read_value() for buffer in self._buffers])
                return tf.constant(True)

            tf.cond(self._queue.size() < self.slots, put, lambda: tf.constant(False))
            self.pending.assign(0)
            return tf.constant(True)

        return tf.cond(self.pending.read_value() > 0, enqueue, lambda: tf.constant(False))

    def _create(self, leaves, variables, data, xla=False):
        self.xla = xla
        # Per dtype (XLA: the flat buffers) or per variable, in the order of `variables`.
        self._dtypes = sorted({_dtype(v) for v in variables}, key=lambda d: d.name)
        with tf.init_scope():
            weight_types = self._dtypes if xla else [_dtype(v) for v in variables]
            self._queue = tf.queue.FIFOQueue(self.slots, [tf.int64] + [leaf.dtype for leaf in leaves] + weight_types)
            if xla:  # a variable keeps its shape under XLA: the buffers are allocated now
                self._buffers = [tf.Variable(tf.zeros([sum(_size(v) for v in variables if _dtype(v) == d)], d),
                                             trainable=False) for d in self._dtypes]
                self.pending = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self._bound_set = max(self._host_bound, self._floor)
            self.bound = tf.Variable(self._bound_set, dtype=tf.float32, trainable=False)
        self._structure = _structure_of(data)
        self._template = tf.nest.map_structure(lambda t: t is not None, data)
        self._leaf_count = len(leaves)
        self._variables = variables
        self.ready = True

    def explodes(self, global_norm):
        """In-graph: this step may explode, or (with the step's own verdict) is
        worth keeping (see the module): its norm reaches the bound, or is NaN/Inf. (Not `not norm < bound`:
        Grappler rewrites it to `norm >= bound`, false for NaN.)"""
        return tf.logical_or(tf.logical_not(tf.math.is_finite(global_norm)),
                             global_norm >= self.bound.read_value())

    # -- host -----------------------------------------------------------------------
    def _unflatten(self, flats):
        """The per-variable arrays of the per-dtype flat snapshots (XLA)."""
        offsets = {dtype: 0 for dtype in self._dtypes}
        by_dtype = dict(zip(self._dtypes, flats))
        weights = []
        for variable in self._variables:
            shape = tuple(int(d) for d in variable.shape)
            dtype = _dtype(variable)
            start = offsets[dtype]
            weights.append(np.array(by_dtype[dtype][start:start + _size(variable)]).reshape(shape))
            offsets[dtype] = start + _size(variable)
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

    def waiting(self):
        """Host: how many kept batches wait on the device (one scalar read)."""
        return int(self._queue.size().numpy()) if self.ready else 0

    def take(self):
        """Host: the kept batches, dequeued (their memory is freed); one scalar read when none."""
        kept = []
        for _ in range(self.waiting()):
            parts = [np.array(part) for part in self._queue.dequeue()]
            leaves, weights = parts[1:1 + self._leaf_count], parts[1 + self._leaf_count:]
            if self.xla:
                weights = self._unflatten(weights)
            kept.append(KeptBatch(int(parts[0]), _pack(self._template, leaves), weights, self._variables))
        return kept


def _flat(variables, dtype):
    """In-graph: the values of `variables` of `dtype`, flattened and concatenated."""
    return tf.concat([tf.reshape(variable_value(w), [-1]) for w in variables if _dtype(w) == dtype], 0)


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

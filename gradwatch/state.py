"""On-device state of a monitored run: a ring buffer of per-step records, the
adaptive detector's statistics and the clipping state, in `tf.Variable`s.

Written from inside the compiled train step (one row per optimizer update),
read from the host by the callback every few steps. Under a distribution
strategy the variables are `ON_READ` / `ONLY_FIRST_REPLICA`: each replica
writes its own copy (all replicas compute identical values from the
all-reduced gradient) and the host reads the first replica's.
"""

import numpy as np
import tensorflow as tf

# Columns of a record row; the per-layer norms follow from LAYERS_START.
GLOBAL, GLOBAL_CLIPPED, THRESHOLD, CLIP_THRESHOLD, FLAGS = range(5)
LAYERS_START = 5

# Bits of the FLAGS column.
EXPLODED, NONFINITE, SKIPPED, CLIP_SWITCHED_ON, CLIP_ACTIVE, OVERFLOW, RESTARTED = (
    1, 2, 4, 8, 16, 32, 64)


# `DeviceState.overshoot[KEPT_STEP]`: the step whose weights a restart or a
# rollback goes back to (exact in float32 up to step 2**24).
KEPT_STEP = 6
NOT_KEPT = -1e9  # before any: every step is long enough after it


def has_flag(flags, bit):
    """Vectorised flag test on a float FLAGS column (numpy)."""
    return (np.asarray(flags).astype(np.int64) & bit) != 0


# Leading columns of the stored rows (float64, exact for integers below 2**53):
# the record's sequence number (-1: never written) and its step.
_SEQ, _STEP, _STORED_START = 0, 1, 2


class DeviceState:
    """The variables; created under `strategy`'s scope.

    A record is stored as one float64 row `[sequence, step, *row]`, so that a
    step costs one scatter and the host one read.
    """

    def __init__(self, strategy, num_layers, capacity, adaptive_state, auto_shape=None, weight_shapes=None):
        self.num_layers = num_layers
        self.capacity = capacity
        with strategy.scope():
            make = _variable_factory(strategy)
            width = _STORED_START + LAYERS_START + num_layers
            self.records = make(tf.fill([capacity, width], tf.constant(-1.0, tf.float64)))
            self.record_count = make(tf.zeros([], tf.int64))
            # The adaptive detector's state, packed: `[count, *window]`.
            self.adaptive = make(tf.cast(adaptive_state, tf.float32))
            self.clip_active = make(tf.constant(False))
            # `clip_threshold="auto"`: the window of recent healthy statistics
            # `[window, columns]` (`clipping.AutoThreshold`) and the threshold
            # per column; else the threshold alone, `[1]`.
            columns = auto_shape[1] if auto_shape else 1
            self.clip_threshold = make(tf.zeros([columns], tf.float32))
            if auto_shape:
                self.auto_window = make(tf.zeros(auto_shape, tf.float32))
                self.auto_count = make(tf.zeros([], tf.int64))
                # The threshold at the switch (the healthy baseline, per
                # column), the scale that shrinks it while a clipped run
                # keeps growing, and the global norm that growth is measured
                # from (`clipping.AutoThreshold`).
                self.auto_base = make(tf.zeros([columns], tf.float32))
                self.auto_scale = make(tf.ones([], tf.float32))
                self.reference_norm = make(tf.zeros([], tf.float32))
                # The detector's typical norm at the switch (the run's healthy scale).
                self.typical_base = make(tf.zeros([], tf.float32))
            if weight_shapes is not None:
                # The overshoot watch (`AutoThreshold.overshoot_gain`, `update_gain`):
                # the weights of the last step while clipping is on (before the
                # switch, for a restart or a rollback, those of a quiet step); the
                # running cosine, its count, what the weights kept are
                # (`clipping.KEPT_*`), the cosine's factor, the size factor, the
                # last update's size and the step whose weights were kept before
                # the switch (`KEPT_STEP`).
                self.previous_weights = [make(tf.zeros(shape, tf.float32)) for shape in weight_shapes]
                self.overshoot = make(tf.constant([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, NOT_KEPT], tf.float32))

    def append(self, step, row):
        """In-graph: writes one record at the next ring-buffer slot; returns
        the stored row (`[sequence, step, *row]`)."""
        count = self.record_count.read_value()
        slot = tf.reshape(tf.cast(count % self.capacity, tf.int32), [1, 1])
        stored = tf.concat([tf.cast(tf.stack([count, tf.cast(step, tf.int64)]), tf.float64),
                            tf.cast(row, tf.float64)], axis=0)
        _local(self.records).scatter_nd_update(slot, tf.reshape(stored, [1, -1]))
        self.record_count.assign(count + 1)
        return stored

    def latest_record(self):
        """In-graph: the last record written, as stored (`[sequence, step, *row]`)."""
        slot = tf.cast((self.record_count.read_value() - 1) % self.capacity, tf.int32)
        return self.records.sparse_read(slot)

    def remember(self, values, healthy):
        """In-graph: appends the row `values` to the "auto" window when `healthy`."""
        count = self.auto_count.read_value()
        size = self.auto_window.shape[0]
        slot = tf.reshape(tf.cast(count % size, tf.int32), [1, 1])
        old = tf.gather_nd(self.auto_window.read_value(), slot)
        new = tf.where(healthy, tf.reshape(values, [1, -1]), old)
        _local(self.auto_window).scatter_nd_update(slot, new)
        self.auto_count.assign(count + tf.cast(healthy, tf.int64))

    def read_since(self, already_read, latest=None):
        """Host: `(steps, rows, total, lost)` of the records after the first
        `already_read`; `lost` counts records overwritten before being read.

        `latest`: the stored row that `latest_record()` returned at the end of
        the last train step, or None. When it is the only new record, it is
        used as is; else the device buffer is read (one read).
        """
        if latest is not None:
            latest = np.array(latest.numpy() if hasattr(latest, "numpy") else latest, np.float64)  # a copy
            if latest[_SEQ] == already_read:
                return (latest[None, _STEP].astype(np.int64), latest[None, _STORED_START:],
                        already_read + 1, 0)
        stored = _host_value(self.records)
        sequence = stored[:, _SEQ]
        fresh = np.flatnonzero(sequence >= already_read)
        fresh = fresh[np.argsort(sequence[fresh], kind="stable")]
        total = int(sequence.max()) + 1 if len(sequence) else 0
        total = max(total, already_read)
        lost = (total - already_read) - len(fresh)
        steps = stored[fresh, _STEP].astype(np.int64)
        rows = stored[fresh, _STORED_START:]
        return steps, rows, total, lost

    def records_written(self):
        """Host: how many records the step has written so far."""
        return int(_host_value(self.record_count))

    def set_clip_state(self, active, threshold):
        self.clip_active.assign(bool(active))
        self.clip_threshold.assign(tf.fill(self.clip_threshold.shape, float(threshold)))


def is_distributed(strategy):
    """Whether `strategy` is a real distribution strategy (not TF's default one)."""
    return type(strategy).__name__ != "_DefaultDistributionStrategy"


def _variable_factory(strategy):
    distributed = is_distributed(strategy)

    def make(initial):
        if distributed:
            return tf.Variable(
                initial, trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        return tf.Variable(initial, trainable=False)

    return make


def backend_variable(variable):
    """The TensorFlow variable behind a Keras 3 variable (under a distribution
    strategy, its distributed variable, which `extended.update` takes); a
    `tf.Variable` itself, or anything else, as it is."""
    inner = getattr(variable, "_value", None)
    return inner if isinstance(inner, tf.Variable) else variable


def variable_value(variable):
    """In-graph: the current value of a Keras 3 or tf.Variable (never autocast)."""
    variable = backend_variable(variable)
    if isinstance(variable, tf.Variable):
        return variable.read_value()
    return tf.convert_to_tensor(variable)


def _local(variable):
    """This replica's copy of an `ON_READ` variable (scatter ops need it)."""
    if isinstance(variable, tf.distribute.DistributedValues):
        return variable._get_on_device_or_primary()
    return variable


def kept_step(device_state):
    """Host side: the step whose weights a restart or a rollback went back
    to (the weights before that step's update), or None if none were kept."""
    overshoot = getattr(device_state, "overshoot", None)
    if overshoot is None:
        return None
    step = float(_host_value(overshoot)[KEPT_STEP])
    return int(step) if step >= 1 else None


def _host_value(variable):
    if isinstance(variable, tf.distribute.DistributedValues):
        return np.asarray(tf.convert_to_tensor(variable))  # the first replica's copy
    return variable.value().numpy()

"""The in-graph clipping rule and the "auto" clipping threshold. Pure maths.

Formulas follow Keras' own (`clipnorm`: `g * t / max(||g||, t)` per variable,
with TensorFlow's `tf.clip_by_norm` as Keras calls it; `global_clipnorm`: the
same on the global norm, Pascanu et al. 2013; `clipvalue`: each entry into
`[-t, t]`), so clipping through gradwatch gives the update Keras would give, bit
for bit on one device -- but on the all-reduced gradient.

Example:

>>> import tensorflow as tf
>>> g = [tf.constant([3.0, 4.0])]
>>> clipped = clip_gradients(g, "global_clipnorm", 1.0, tf.constant(True))
>>> [round(float(x), 3) for x in clipped[0]]
[0.6, 0.8]
"""

import dataclasses

import tensorflow as tf

MODES = ("clipnorm", "global_clipnorm", "clipvalue")


@dataclasses.dataclass(frozen=True)
class AutoThreshold:
    """How `clip_threshold="auto"` sets the clipping threshold (AutoClip,
    Seetharaman et al. 2020, over a window and per variable).

    Every healthy step (not exploded, finite) adds its statistic to a window
    of the last `window` values: each variable's gradient norm for
    `clipnorm` (the quantity `clipnorm` bounds: one threshold per variable),
    the global norm for `global_clipnorm`, the root-mean-square gradient
    entry for `clipvalue`. From the switch on, the threshold of each step is
    the `percentile`-th percentile of that window, this step included: it
    follows the run. Zero entries are left out (`window_percentile`).

    Why these defaults (`benchmarks/auto_threshold.py`: rare corrupted
    targets, MLP and GRU regressors, SGD + momentum, 15 runs; clean val MSE
    over that of the best of `clipnorm` 0.1/0.3/1/3 from the start): the
    25th percentile per variable, worst 1.23x, geometric mean 0.93x; 10th
    1.27x / 0.94x; 50th 1.38x / 1.01x; one threshold pooled over all
    variables' norms, 25th 1.26x / 1.06x, 50th 1.32x / 0.97x; the rule before
    (90th percentile of the global norm, frozen at the switch) 17.8x / 7.2x.
    Once a run has exploded, a threshold below the typical norm -- most steps
    clipped, the bad ones no larger than ordinary ones -- trains best. A
    window of 64 instead of 256 changed little (50th percentile, 6 runs of an
    earlier round: 0.93-1.26x vs 1.02-1.80x). `global_clipnorm` (6 runs):
    worst 1.11x of the best fixed `global_clipnorm`. `clipvalue` (6 runs): the
    root-mean-square entry 0.28-1.02x of the best fixed `clipvalue`, the
    largest entry up to 6.1x (it clipped only the top entries).

    Attributes:
        percentile: the percentile of the window (nearest rank), in (0, 100].
        window: how many recent healthy values the percentile looks at.
        per_variable: `clipnorm` only: one threshold per variable, from that
            variable's own norms; else one threshold from all variables' norms.
        follow: update the threshold every step after the switch; False
            freezes it at the switch (as the rule before issue 13 did).
    """

    percentile: float = 25.0
    window: int = 256
    per_variable: bool = True
    follow: bool = True

    def __post_init__(self):
        q, window = self.percentile, self.window
        if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 100):
            raise ValueError(f"`percentile` must be a number in (0, 100]. Received: percentile={q!r}")
        if not (isinstance(window, int) and not isinstance(window, bool) and window > 0):
            raise ValueError(f"`window` must be a positive integer. Received: window={window!r}")


AUTO = AutoThreshold()


def _scale(grad, factor):
    factor = tf.cast(factor, grad.dtype)
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


def norm_clip_factor(sq_norm, threshold, active):
    """`t / max(norm, t)` when active, else exactly 1 (float32)."""
    norm = tf.sqrt(sq_norm)
    factor = threshold / tf.maximum(norm, threshold)
    return tf.where(active, factor, tf.ones_like(factor))


def clip_gradients(grads, mode, threshold, active):
    """Clips `grads` by `mode` at `threshold` where `active` (a bool scalar).

    For `clipnorm`, `threshold` may also be a vector: one threshold per
    gradient (`clip_threshold="auto"` per variable). When `active` is false the
    gradients come back unchanged, bit for bit.
    """
    threshold = tf.cast(threshold, tf.float32)
    if mode == "clipvalue":
        return [None if g is None else _clip_value(g, threshold, active) for g in grads]
    if mode == "clipnorm":
        per_gradient = threshold.shape.rank == 1
        return [None if g is None else _clip_norm(g, threshold[i] if per_gradient else threshold, active)
                for i, g in enumerate(grads)]
    if mode == "global_clipnorm":
        return _clip_global_norm(grads, threshold, active)
    raise ValueError(f"Unknown clipping mode: {mode!r}. Expected one of {MODES}.")


def _clip_global_norm(grads, threshold, active):
    # Keras' own `clip_by_global_norm`, op for op, so the update is bit-identical:
    # scale = t * min(1 / ||g||, 1 / t), made NaN by a non-finite norm.
    present = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
               for g in grads if g is not None]
    norm = tf.sqrt(tf.reduce_sum(tf.stack([tf.reduce_sum(tf.square(g)) for g in present])))
    scale = threshold * tf.minimum(1.0 / norm, 1.0 / threshold) + (norm - norm)
    scale = tf.where(active, scale, tf.ones_like(scale))
    return [None if g is None else _scale(g, scale) for g in grads]


def _clip_norm(grad, threshold, active):
    # Keras' TensorFlow backend clips with `tf.clip_by_norm` (the norm of an
    # IndexedSlices' values); the same op keeps the update bit-identical.
    clipped = tf.clip_by_norm(grad, threshold)
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(tf.where(active, clipped.values, grad.values), grad.indices,
                                grad.dense_shape)
    return tf.where(active, clipped, grad)


def _clip_value(grad, threshold, active):
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.convert_to_tensor(grad)
    limit = tf.cast(threshold, grad.dtype)
    return tf.where(active, tf.clip_by_value(grad, -limit, limit), grad)


def auto_statistic(mode, grads, variable_sq_norms):
    """The float32 vector one step adds to the "auto" window (see `AutoThreshold`).

    `clipnorm`: each variable's norm (`[len(grads)]`); `global_clipnorm`: the
    global norm (`[1]`); `clipvalue`: the root-mean-square entry, the global
    norm over the square root of the number of entries (`[1]`).
    """
    if mode == "clipnorm":
        return tf.sqrt(tf.cast(variable_sq_norms, tf.float32))
    if mode == "global_clipnorm":
        return tf.reshape(tf.sqrt(tf.reduce_sum(tf.cast(variable_sq_norms, tf.float32))), [1])
    if mode == "clipvalue":
        sizes = [tf.cast(tf.reduce_prod(g.dense_shape) if isinstance(g, tf.IndexedSlices) else tf.size(g),
                         tf.float32) for g in grads if g is not None]
        entries = tf.maximum(tf.add_n(sizes) if sizes else tf.constant(0.0), 1.0)
        return tf.reshape(tf.sqrt(tf.reduce_sum(tf.cast(variable_sq_norms, tf.float32)) / entries), [1])
    raise ValueError(f"Unknown clipping mode: {mode!r}. Expected one of {MODES}.")


def window_percentile(history, count, q, pooled=False):
    """The `q`-th percentile (nearest rank) of the positive entries of each
    column of the valid rows of a ring buffer `history` `[window, k]` that has
    received `count` rows (the first `min(count, window)` rows are valid); NaN
    for a column without any. Zero entries (a variable without gradient at
    that step) carry no information about the gradient's scale: they are left
    out, so a variable whose gradient is often zero is not clipped to zero.

    `pooled`: one percentile of all such entries, repeated over the `k` columns.

    >>> history = tf.constant([[1.0, 10.0], [3.0, 0.0], [2.0, 20.0], [0.0, 0.0]])
    >>> window_percentile(history, 3, 50.0).numpy().tolist()
    [2.0, 10.0]
    >>> window_percentile(history, 3, 50.0, pooled=True).numpy().tolist()
    [3.0, 3.0]
    """
    history = tf.convert_to_tensor(history, tf.float32)
    size, columns = tf.shape(history)[0], tf.shape(history)[1]
    rows = tf.range(size)[:, None] < tf.minimum(tf.cast(count, tf.int32), size)
    usable = tf.logical_and(rows, history > 0)
    masked = tf.where(usable, history, float("inf"))
    if pooled:
        masked, usable = tf.reshape(masked, [-1, 1]), tf.reshape(usable, [-1, 1])
    valid = tf.reduce_sum(tf.cast(usable, tf.int32), axis=0)  # per column
    ordered = tf.sort(masked, axis=0)
    rank = tf.cast(tf.math.ceil(q / 100.0 * tf.cast(valid, tf.float32)), tf.int32) - 1
    rank = tf.clip_by_value(rank, 0, tf.shape(masked)[0] - 1)
    chosen = tf.gather(tf.transpose(ordered), rank[:, None], batch_dims=1)[:, 0]
    chosen = tf.where(valid > 0, chosen, float("nan"))
    return tf.broadcast_to(chosen, [columns])

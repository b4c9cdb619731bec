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

import tensorflow as tf

MODES = ("clipnorm", "global_clipnorm", "clipvalue")

# "auto" threshold: this percentile of the recent healthy global norms.
AUTO_PERCENTILE = 90.0
# How many recent healthy global norms the "auto" threshold looks at.
AUTO_HISTORY = 512


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

    When `active` is false the gradients come back unchanged, bit for bit.
    """
    threshold = tf.cast(threshold, tf.float32)
    if mode == "clipvalue":
        return [None if g is None else _clip_value(g, threshold, active) for g in grads]
    if mode == "clipnorm":
        return [None if g is None else _clip_norm(g, threshold, active) for g in grads]
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


def percentile(history, count, q):
    """The `q`-th percentile (nearest rank) of the first `min(count, size)`
    entries of a ring buffer `history`; NaN when it is empty."""
    size = tf.shape(history)[0]
    valid = tf.minimum(tf.cast(count, tf.int32), size)
    masked = tf.where(tf.range(size) < valid, history, tf.fill([size], float("inf")))
    ordered = tf.sort(masked)
    rank = tf.cast(tf.math.ceil(q / 100.0 * tf.cast(valid, tf.float32)), tf.int32) - 1
    rank = tf.clip_by_value(rank, 0, size - 1)
    return tf.where(valid > 0, ordered[rank], float("nan"))

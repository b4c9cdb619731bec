"""The in-graph clipping rule and the "auto" clipping threshold. Pure maths.

Formulas follow Keras' own (`clipnorm`: `g * t / max(||g||, t)` per variable;
`global_clipnorm`: the same on the global norm, Pascanu et al. 2013;
`clipvalue`: each entry into `[-t, t]`), so turning clipping on through
gradwatch gives the update Keras would give -- but on the all-reduced gradient.

Example:

>>> import tensorflow as tf
>>> g = [tf.constant([3.0, 4.0])]
>>> clipped = clip_gradients(g, "global_clipnorm", 1.0, tf.constant(True),
...                          variable_sq_norms=tf.constant([25.0]))
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


def clip_gradients(grads, mode, threshold, active, variable_sq_norms):
    """Clips `grads` by `mode` at `threshold` where `active` (a bool scalar).

    `variable_sq_norms[i]` is the squared norm of `grads[i]` (float32). When
    `active` is false the gradients come back unchanged, bit for bit.
    """
    threshold = tf.cast(threshold, tf.float32)
    if mode == "clipvalue":
        return [None if g is None else _clip_value(g, threshold, active) for g in grads]
    if mode == "global_clipnorm":
        factors = tf.fill(tf.shape(variable_sq_norms), norm_clip_factor(
            tf.reduce_sum(variable_sq_norms), threshold, active))
    elif mode == "clipnorm":
        factors = norm_clip_factor(variable_sq_norms, threshold, active)
    else:
        raise ValueError(f"Unknown clipping mode: {mode!r}. Expected one of {MODES}.")
    factors = tf.unstack(factors, num=len(grads))  # one op, not one slice per gradient
    return [None if g is None else _scale(g, factor) for g, factor in zip(grads, factors)]


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

"""Each sample's loss and gradient norm, on the host, at the weights a step saw.

`per_sample(model, kept)` sets the weights the step updated back to their
values before the update (kept in-graph with the batch), computes for each
sample of the batch alone its loss -- the model's compiled loss on that one
sample with its sample weight, the model called with `training=False`
(dropout off, BatchNorm's moving statistics as they are when ranking) -- and
the L2 norm of that loss's gradient with respect to the model's trainable
weights, then puts the current weights back. The model's metrics (Keras'
per-output loss trackers) are restored too: ranking leaves no trace in the run.
Regularization losses (`model.losses`) are not a sample's term and are left out.
"""

import numpy as np
import tensorflow as tf

from gradwatch.culprits.ranking import unpack


class CannotRank(Exception):
    """The kept batch cannot be ranked (the message says why)."""


def batch_size(x):
    sizes = {np.shape(leaf)[0] for leaf in tf.nest.flatten(x) if leaf is not None and np.ndim(leaf)}
    if len(sizes) != 1:
        raise CannotRank(f"the batch's inputs do not share one batch size ({sorted(sizes)})")
    return sizes.pop()


def _loss_function(model):
    """`loss(x, y, y_pred, sample_weight)`: the data term of the model's loss."""
    import keras

    if isinstance(model, keras.Model):
        own = type(model).compute_loss is not keras.Model.compute_loss
        if own:
            return lambda x, y, y_pred, sw: model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw,
                                                               training=False)
        compiled = getattr(model, "_compile_loss", None)
        if compiled is None:
            raise CannotRank("the model has no compiled loss to rank the samples by (a custom "
                             "train_step without `compile(loss=...)`); the batch is kept: Explosion.batch()")
        return lambda x, y, y_pred, sw: compiled(y, y_pred, sw)
    compiled = getattr(model, "compiled_loss", None)  # tf_keras
    if compiled is None or getattr(compiled, "_losses", None) is None:
        raise CannotRank("the model has no compiled loss to rank the samples by (a custom "
                         "train_step without `compile(loss=...)`); the batch is kept: Explosion.batch()")
    return lambda x, y, y_pred, sw: compiled(y, y_pred, sw, regularization_losses=[])


def _metric_variables(model):
    found, seen = [], set()
    for metric in getattr(model, "metrics", []) or []:
        for variable in getattr(metric, "variables", []) or []:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def data_size(x, y, size):
    """Per sample: the largest absolute value of its input and target leaves
    (inf where one is NaN/Inf): `ranking.rank`'s lead among NaN samples."""
    found = np.zeros([size])
    for leaf in tf.nest.flatten((x, y)):
        if leaf is None:
            continue
        array = np.asarray(leaf)
        if array.ndim == 0 or len(array) != size or not np.issubdtype(array.dtype, np.number):
            continue
        flat = np.abs(array.reshape(size, -1).astype(np.float64))
        flat = np.where(np.isfinite(flat), flat, np.inf)
        found = np.maximum(found, flat.max(axis=1) if flat.shape[1] else 0.0)
    return found


def per_sample(model, kept, cache=None):
    """`(losses, grad_norms)` (NumPy float64, one entry per sample) of a `KeptBatch`.

    `cache`: a dict kept across calls (one per `fit()`): the compiled
    per-sample function, traced once (a sample at a time, eagerly, if it
    cannot be compiled)."""
    x, y, sample_weight = unpack(kept.data)
    if x is None:
        raise CannotRank("the kept batch has no inputs")
    size = batch_size(x)
    loss = _loss_function(model)
    if not all(np.isfinite(w).all() for w in kept.weights if np.issubdtype(w.dtype, np.floating)):
        # The step's weights already held NaN/Inf: every sample's loss and gradient do.
        return np.full([size], np.nan), np.full([size], np.nan)
    trainable = list(model.trainable_variables)
    metric_vars = _metric_variables(model)
    metric_values = [np.array(v.numpy()) for v in metric_vars]
    current = [np.array(v.numpy()) for v in kept.variables]
    for variable, value in zip(kept.variables, kept.weights):
        variable.assign(value)
    cache = {} if cache is None else cache
    try:
        def loss_and_norm(xi, yi, wi):
            with tf.GradientTape() as tape:
                y_pred = model(xi, training=False)
                value = loss(xi, yi, y_pred, wi)
            grads = tape.gradient(value, trainable)
            squares = [tf.reduce_sum(tf.square(tf.cast(_dense_values(g), tf.float64)))
                       for g in grads if g is not None]
            norm = tf.sqrt(tf.add_n(squares)) if squares else tf.constant(0.0, tf.float64)
            return value, norm

        if "compiled" not in cache:
            cache["compiled"] = tf.function(loss_and_norm, reduce_retracing=True)

        def one(i):
            def take(leaf):
                return None if leaf is None else tf.convert_to_tensor(leaf[i:i + 1])
            xi, yi, wi = (tf.nest.map_structure(take, part) if part is not None else None
                          for part in (x, y, sample_weight))
            if cache["compiled"] is not None:
                try:
                    value, norm = cache["compiled"](xi, yi, wi)
                    return float(value), float(norm)
                except Exception:  # e.g. a model that only runs eagerly: a sample at a time, eagerly
                    cache["compiled"] = None
            value, norm = loss_and_norm(xi, yi, wi)
            return float(value), float(norm)

        results = [one(i) for i in range(size)]
    finally:
        for variable, value in zip(kept.variables, current):
            variable.assign(value)
        for variable, value in zip(metric_vars, metric_values):
            variable.assign(value)
    losses = np.array([r[0] for r in results], np.float64)
    norms = np.array([r[1] for r in results], np.float64)
    return losses, norms


def _dense_values(grad):
    """The entries of a gradient (an `IndexedSlices`' rows summed per index)."""
    if isinstance(grad, tf.IndexedSlices):
        unique, position = tf.unique(grad.indices)
        return tf.math.unsorted_segment_sum(grad.values, position, tf.size(unique))
    return grad

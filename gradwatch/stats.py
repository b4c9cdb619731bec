"""Pure gradient statistics: layer grouping, squared norms, global norm.

Everything here is side-effect free and works eagerly, inside `tf.function`
and under XLA (`jit_compile=True`): static shapes only, no `tf.unique`.

Example:

>>> import tensorflow as tf
>>> grads = [tf.constant([3.0, 4.0]), tf.constant([12.0])]
>>> sq = layer_squared_norms(grads, layer_ids=[0, 0], num_layers=1)
>>> float(tf.sqrt(sq[0]))
13.0
"""

import tensorflow as tf


def layer_paths(model, variables=None):
    """Orders the variables an optimizer updates into reported layers.

    `variables`: the variables of the optimizer's step (default: the model's
    trainable variables). Returns `(paths, layer_of_variable)`: the paths of the
    layers holding them, in model order, and a dict from `id(variable)` to an
    index into `paths`. Top-level layers are named by their name; layers of
    nested models as `outer/inner`; a layer that is not a model (an RNN and its
    cell, an attention block) reports all of its variables under its own path.
    Variables owned by a model directly are reported under the variable's name.
    A layer none of whose variables is in `variables` is left out (a layer that
    another optimizer updates, a frozen one). A variable the model does not
    hold is reported under its own path without the last part (Keras 3
    `variable.path` such as `critic/dense/kernel` gives `critic/dense`).
    """
    paths, layer_of_variable = [], {}

    def claim(path, variables):
        fresh = [v for v in variables if id(v) not in layer_of_variable]
        if not fresh:
            return
        if path not in paths:
            paths.append(path)
        for variable in fresh:
            layer_of_variable[id(variable)] = paths.index(path)

    def walk(container, prefix):
        for layer in _direct_sublayers(container):
            path = prefix + layer.name
            if _is_model(layer):
                walk(layer, path + "/")
            claim(path, layer.trainable_variables)
        for variable in container.trainable_variables:
            if id(variable) not in layer_of_variable:
                claim(prefix + variable.name, [variable])

    walk(model, "")
    if variables is None:
        return paths, layer_of_variable
    return _restrict(paths, layer_of_variable, list(variables))


def _restrict(paths, layer_of_variable, variables):
    """`(paths, layer_of_variable)` for `variables` only (see `layer_paths`)."""
    path_of = {id(v): (paths[layer_of_variable[id(v)]] if id(v) in layer_of_variable else None)
               for v in variables}
    used = {path for path in path_of.values() if path is not None}
    kept = [path for path in paths if path in used]  # model order
    for variable in variables:
        if path_of[id(variable)] is None:
            path_of[id(variable)] = _outside_path(variable)
            if path_of[id(variable)] not in used:
                used.add(path_of[id(variable)])
                kept.append(path_of[id(variable)])
    position = {path: index for index, path in enumerate(kept)}
    return kept, {key: position[path] for key, path in path_of.items()}


def _outside_path(variable):
    """Layer path of a variable the model does not hold: its path minus the last part."""
    path = str(getattr(variable, "path", None) or getattr(variable, "name", "variable"))
    path = path.split(":")[0]
    return path.rsplit("/", 1)[0] if "/" in path else path


def _is_model(layer):
    import sys

    import keras

    tf_keras = sys.modules.get("tf_keras")  # tf_keras models too, never importing it
    return isinstance(layer, keras.Model) or (tf_keras is not None and isinstance(layer, tf_keras.Model))


def _direct_sublayers(container):
    if hasattr(container, "_flatten_layers"):
        return list(container._flatten_layers(include_self=False, recursive=False))
    return list(getattr(container, "layers", []))


def squared_norm(grad):
    """Squared L2 norm of one gradient, in float32.

    For `tf.IndexedSlices` (e.g. `Embedding`), rows sharing an index are summed
    first: the gradient is the sum of its slices, and a norm over `.values`
    would be wrong whenever an index repeats.
    """
    if isinstance(grad, tf.IndexedSlices):
        return tf.reduce_sum(tf.square(combine_duplicate_rows(grad)))
    return tf.reduce_sum(tf.square(tf.cast(grad, tf.float32)))


def combine_duplicate_rows(slices):
    """The rows of `slices` with repeated indices summed (zero-padded rows).

    Sort-based, so it has a static shape and compiles under XLA.
    """
    values = tf.cast(slices.values, tf.float32)
    indices = tf.cast(slices.indices, tf.int64)
    order = tf.argsort(indices, stable=True)
    sorted_indices = tf.gather(indices, order)
    starts_new_row = tf.concat(
        [tf.zeros([1], tf.int64),
         tf.cast(sorted_indices[1:] != sorted_indices[:-1], tf.int64)], axis=0)
    segment_ids = tf.cumsum(starts_new_row)
    return tf.math.unsorted_segment_sum(
        tf.gather(values, order), segment_ids, num_segments=tf.shape(values)[0])


def variable_squared_norms(grads):
    """Squared norm of each gradient (`[len(grads)]` float32); `None` gives 0.

    Dense gradients take one op each (`tf.nn.l2_loss`, half the squared norm).
    """
    if not grads:
        return tf.zeros([0], tf.float32)
    return 2.0 * tf.stack([_half_squared_norm(g) for g in grads])


def _half_squared_norm(grad):
    if grad is None:
        return tf.zeros([], tf.float32)
    if isinstance(grad, tf.IndexedSlices):
        return 0.5 * squared_norm(grad)
    return tf.nn.l2_loss(tf.cast(grad, tf.float32))


def layer_squared_norms(grads, layer_ids, num_layers):
    """Per-layer squared norms: `[num_layers]` float32, summed over variables.

    `layer_ids[i]` is the layer index of `grads[i]`; a `None` gradient (a
    variable that got no gradient this step) contributes zero.
    """
    return sum_by_layer(variable_squared_norms(grads), layer_ids, num_layers)


def sum_by_layer(variable_sq_norms, layer_ids, num_layers):
    """Adds per-variable squared norms into `[num_layers]` per-layer sums."""
    return tf.math.unsorted_segment_sum(
        variable_sq_norms, tf.constant(list(layer_ids), tf.int32), num_segments=num_layers)


def global_norm(layer_sq_norms):
    """Global L2 norm from per-layer squared norms (NaN/Inf propagate)."""
    return tf.sqrt(tf.reduce_sum(layer_sq_norms))


def is_nonfinite(layer_sq_norms):
    """True when any gradient entry is NaN or Inf.

    A sum of squares is non-finite exactly when an entry is NaN/Inf, or when
    the norm overflows float32 (above ~1.8e19), which counts the same way.
    """
    return tf.logical_not(tf.math.is_finite(tf.reduce_sum(layer_sq_norms)))

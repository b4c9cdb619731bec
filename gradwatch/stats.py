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


def layer_paths(model, variables=None, sublayers=0):
    """Orders the variables an optimizer updates into reported layers.

    `variables`: the variables of the optimizer's step (default: the model's
    trainable variables). Returns `(paths, layer_of_variable)`: the paths of the
    reported layers, in model order, and a dict from `id(variable)` to an index
    into `paths`.

    Each variable is reported under a layer that holds it, found from the
    layers that hold it, whatever the `trainable` flags of the layers above
    it: the outermost layer holding it that is not a model and is trainable
    (`layer.trainable`); models (`outer/inner` for a nested one) and frozen
    layers are walked through. So a layer that is not a model (an RNN and its
    cell, a transformer block) reports all of its variables under its own path,
    and where a frozen block keeps some sublayers trainable (LoRA: keras-hub's
    `enable_lora` freezes each transformer layer and re-enables its query and
    value sublayers) each trainable sublayer has its own row, such as
    `gpt2_backbone/transformer_layer_0/self_attention/query`.

    `sublayers`: how many levels of sublayers below that layer get rows of
    their own (0: none). With 1, a transformer block's attention, feed-forward
    layers and norms are reported apart (`.../transformer_layer_0/self_attention`,
    `.../feedforward_output_dense`, ...); with 2 also the attention's query,
    key, value and output. A variable is never reported deeper than the layer
    that holds it.

    No row holds variables of two different layers (two layers of one path get
    `path`, `path_2`, ...). Variables owned by a model directly are reported
    under the model's path and the variable's name. A layer none of whose
    variables is in `variables` is left out (a layer that another optimizer
    updates, a frozen one). A variable the model does not hold is reported
    under its own path without the last part (Keras 3 `variable.path` such as
    `critic/dense/kernel` gives `critic/dense`).
    """
    wanted = list(model.trainable_variables) if variables is None else list(variables)
    wanted_ids = {id(v) for v in wanted}
    owner = _owners(model)
    rows = {}  # row key -> [variables]
    for variable in wanted:
        chain = owner.get(id(variable))
        if chain is not None:
            rows.setdefault(_row_key(chain, variable, sublayers), []).append(variable)

    paths, layer_of_variable, index_of = [], {}, {}  # index_of: path -> index into paths

    def claim(key, path):
        fresh = [v for v in rows.pop(key, ()) if id(v) not in layer_of_variable]
        if not fresh:
            return
        unique, number = path, 2
        while unique in index_of:
            unique, number = f"{path}_{number}", number + 1
        index_of[unique] = len(paths)
        paths.append(unique)
        for variable in fresh:
            layer_of_variable[id(variable)] = index_of[unique]

    def walk(container, chain, prefix):
        for layer in _direct_sublayers(container):
            sub = chain + (layer,)
            if len(sub) > _MAX_DEPTH or any(layer is above for above in chain):
                continue
            path = prefix + layer.name
            claim(_ids(sub), path)
            walk(layer, sub, path + "/")
        for variable in _own_variables(container, owner, chain):
            if id(variable) in wanted_ids:
                claim(("model", _ids(chain), id(variable)), prefix + _variable_name(variable))

    walk(model, (), "")
    for variable in wanted:  # held by no layer of the model
        if id(variable) not in layer_of_variable:
            path = _outside_path(variable)
            if path not in index_of:
                index_of[path] = len(paths)
                paths.append(path)
            layer_of_variable[id(variable)] = index_of[path]
    return paths, layer_of_variable


# Nesting deeper than this is not walked (a guard against odd layer graphs).
_MAX_DEPTH = 64


def _ids(chain):
    return tuple(id(layer) for layer in chain)


def _owners(model):
    """`{id(variable): chain}`: the layers from a direct sublayer of `model` down
    to the deepest layer holding the variable (`()` for the model's own)."""
    owner = {id(variable): () for variable in _weights(model)}

    def visit(container, chain):
        for layer in _direct_sublayers(container):
            sub = chain + (layer,)
            if len(sub) > _MAX_DEPTH or any(layer is above for above in chain):
                continue
            for variable in _weights(layer):
                held = owner.get(id(variable))
                # deeper only along the same branch: a layer used twice keeps its first place
                if held is None or _ids(sub[:len(held)]) == _ids(held):
                    owner[id(variable)] = sub
            visit(layer, sub)

    visit(model, ())
    return owner


def _row_key(chain, variable, sublayers):
    """The key of the row of `variable`, held by `chain[-1]` (the model itself when empty)."""
    if not chain or _is_model(chain[-1]):
        return ("model", _ids(chain), id(variable))
    layers = [i for i, layer in enumerate(chain) if not _is_model(layer)]
    trainable = [i for i in layers if getattr(chain[i], "trainable", True)]
    row = (trainable or layers)[0]
    return _ids(chain[:min(row + int(sublayers), len(chain) - 1) + 1])


def _own_variables(container, owner, chain):
    """The variables a model (the root when `chain == ()`) holds itself, not through a layer."""
    if chain and not _is_model(container):
        return []
    return [v for v in _weights(container) if id(v) in owner and _ids(owner[id(v)]) == _ids(chain)]


def _weights(layer):
    try:
        return list(layer.weights)
    except Exception:  # a layer that cannot list its weights holds none we can name
        return []


def _variable_name(variable):
    name = str(getattr(variable, "name", "variable")).split(":")[0]
    return name.rsplit("/", 1)[-1]


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

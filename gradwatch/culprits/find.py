"""`find_culprits`: the culprit samples' indices in the user's own data, by content.

`fit()` shuffles, so a batch position says nothing about where a sample is in
the training data. Each culprit's arrays (its input, and its target if `y` is
given) are compared byte for byte, after casting the user's rows to the dtype
the step saw, with every row of the user's arrays or dataset: a NaN row is
found as well (the same NaN bits). A sample present several times is found at
each place.

Recipe -- drop them and train again::

    bad = gradwatch.find_culprits(monitor.explosions, x_train, y_train)
    keep = np.setdiff1d(np.arange(len(x_train)), bad)
    model.fit(x_train[keep], y_train[keep], ...)       # (dicts: each array[keep])
"""

import numpy as np

from gradwatch.culprits.ranking import BatchNotKeptError, dominant, unpack


def _explosion_list(explosions):
    if hasattr(explosions, "explosions") and not hasattr(explosions, "step"):
        explosions = explosions.explosions  # a GradientMonitor
    if hasattr(explosions, "step"):
        return [explosions]
    return list(explosions)


def _flat(structure):
    import tensorflow as tf

    return [leaf for leaf in tf.nest.flatten(structure) if leaf is not None]


def _rows_as(leaf, dtype):
    """`[n, row bytes]` void view of an array's rows, cast to `dtype`."""
    array = np.ascontiguousarray(np.asarray(leaf).astype(dtype, copy=False))
    if array.ndim == 0:
        raise ValueError("find_culprits needs arrays with one row per sample")
    rows = array.reshape(len(array), -1)
    width = rows.shape[1] * rows.dtype.itemsize
    if width == 0:
        return np.zeros(len(array), dtype=np.dtype((np.void, 1)))
    return np.ascontiguousarray(rows).view(np.dtype((np.void, width))).ravel()


def _samples(explosions, top, with_y):
    """`[(step, [(leaf arrays of one culprit sample)...])]`; explosions without a
    kept, ranked batch are left out."""
    found = []
    for explosion in explosions:
        if not getattr(explosion, "culprits", None):
            continue
        chosen = dominant(explosion.culprits) if top is None else list(explosion.culprits[:top])
        if not chosen:
            continue
        try:
            x, y, _ = explosion.batch()
        except BatchNotKeptError:
            continue
        leaves = _flat(x) + (_flat(y) if with_y and y is not None else [])
        found.append((explosion.step, [[np.asarray(leaf)[c.index] for leaf in leaves] for c in chosen]))
    return found


def _dataset_rows(dataset, with_y, templates):
    """The dataset's leaves concatenated over its elements (batched or not)."""
    columns = None
    for element in dataset.as_numpy_iterator():
        x, y, _ = unpack(element)
        leaves = _flat(x) + (_flat(y) if with_y and y is not None else [])
        if columns is None:
            columns = [[] for _ in leaves]
        for column, leaf, template in zip(columns, leaves, templates):
            leaf = np.asarray(leaf)
            column.append(leaf if leaf.ndim == template.ndim + 1 else leaf[None])
    if columns is None:
        return []
    return [np.concatenate(column) for column in columns]


def find_culprits(explosions, x, y=None, *, top=None, by_step=False):
    """The indices, in your data, of the samples that made the gradient explode.

    Args:
        explosions: `monitor.explosions` (or one `Explosion`, or the monitor).
        x: your training inputs as given to `fit` (array, list/tuple or dict of
            arrays), or a finite `tf.data.Dataset` (of `(x, y)` or `(x, y,
            sample_weight)` elements, batched or not; then leave `y` None: the
            targets are matched too).
        y: your targets (optional): matched too, which tells identical inputs
            with different targets apart.
        top: None (default): the samples each alert named (the share rule,
            `gradwatch.culprits.ranking`; NaN/Inf samples always); an int k:
            the k top-ranked samples of each kept batch.
        by_step: return `{step: [indices]}` (culprits in rank order) instead.

    Returns:
        A sorted NumPy array of unique indices (or the dict); explosions
        whose batch was not kept or ranked add nothing.
    """
    explosions = _explosion_list(explosions)
    is_dataset = hasattr(x, "as_numpy_iterator")
    with_y = y is not None or is_dataset
    wanted = _samples(explosions, top, with_y)
    result = {}
    if not wanted:
        return {} if by_step else np.zeros([0], np.int64)
    templates = wanted[0][1][0]
    if is_dataset:
        leaves = _dataset_rows(x, with_y, templates)
    else:
        leaves = _flat(x) + (_flat(y) if y is not None else [])
    if len(leaves) < len(templates):  # the dataset has no targets where the batch had some
        templates = templates[:len(leaves)]
    views = {}
    for step, samples in wanted:
        indices = []
        for sample in samples:
            match = None
            for position, (leaf, value) in enumerate(zip(leaves, sample)):
                value = np.asarray(value)
                key = (position, value.dtype.str)
                if key not in views:
                    views[key] = _rows_as(leaf, value.dtype)
                target = _rows_as(value[None], value.dtype)[0]
                hits = views[key] == target
                match = hits if match is None else match & hits
            if match is not None:
                indices += [int(i) for i in np.flatnonzero(match) if int(i) not in indices]
        result.setdefault(step, [])
        result[step] += [i for i in indices if i not in result[step]]
    if by_step:
        return result
    return np.unique(np.array([i for found in result.values() for i in found], np.int64))

"""Decoding the `gradwatch/norms` blocks (see `gradwatch.tags`) into per-tag series.

A block is a float32 matrix: row i is step `first + i` (the event's step),
column 0 the global norm, then one column per layer in `gradwatch/layers`
order. TensorBoard keeps every gradwatch tensor (the plugin's loader asks it
to), so blocks give every step even where the scalars are sampled. Blocks of
another width (a file from a different model) make the run fall back to its
scalars. Of rows at the same step, the last written wins.
"""

import numpy as np

from gradwatch import tags


def series_of_blocks(data, layers):
    """Tag -> (steps int64, values float32) of `tags.GLOBAL` and each layer, or {} if unusable.

    `data` is the list of `TensorDatum` of `gradwatch/norms`; all layer series
    share one steps array and are columns of one matrix.
    """
    columns = 1 + len(layers)
    steps, matrices = [], []
    for datum in data:
        matrix = datum.numpy
        if not (isinstance(matrix, np.ndarray) and matrix.ndim == 2 and matrix.shape[1] == columns
                and matrix.dtype == np.float32):
            return {}
        steps.append(np.arange(datum.step, datum.step + matrix.shape[0], dtype=np.int64))
        matrices.append(matrix)
    if not matrices:
        return {}
    steps = np.concatenate(steps)
    matrix = np.concatenate(matrices)
    if steps.size > 1 and not np.all(steps[1:] > steps[:-1]):
        order = np.argsort(steps, kind="stable")
        steps, matrix = steps[order], matrix[order]
        keep_last = np.append(steps[1:] != steps[:-1], True)
        steps, matrix = steps[keep_last], matrix[keep_last]
    matrix = np.asfortranarray(matrix)  # columns contiguous: each series a view
    series = {tags.GLOBAL: (steps, matrix[:, 0])}
    for column, path in enumerate(layers, start=1):
        series[tags.layer_tag(path)] = (steps, matrix[:, column])
    return series

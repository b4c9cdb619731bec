"""Pure logic: the JSON documents the plugin's routes serve, built from `RunData`.

No I/O and no TensorBoard here, so everything is testable with plain numpy.
Long runs are binned by MAX (NaN and +Inf win, as they should in a gradient
monitor): the heat map into at most `columns` step ranges, the global chart
into at most `points` step ranges.
"""

import base64
import math

import numpy as np

from gradwatch import tags
from tensorboard_plugin_gradwatch import records

MISSING = -1.0  # heat-map cell with no stored sample (norms are never negative)
TOP_LAYERS_PER_ALERT = 3
# Response bounds: the heat map shows at most MAX_ROWS layers (the first, in
# model order) and MAX_CELLS cells (fewer columns for many layers), and says so.
MAX_ROWS = 2000
MAX_CELLS = 1_000_000


def as_float(value):
    """A record's number (float, or "nan"/"inf" spelling) as a Python float."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def step_grid(first, last, columns, stored_steps):
    """(bin width in steps, number of bins) covering `first..last` in <= `columns` bins.

    Never more bins than stored steps, so sampled data leaves few empty bins.
    """
    span = last - first + 1
    columns = max(1, min(columns, stored_steps, span))
    width = -(-span // columns)
    return width, -(-span // width)


def max_per_bin(steps, values, first, width):
    """(bin index, max value, first step) per non-empty bin of sorted `steps`.

    np.maximum propagates NaN, and +Inf beats every finite value, so a bin
    holding a NaN is NaN and one holding an Inf (but no NaN) is Inf.
    """
    if steps.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros(0, dtype=np.float32), empty
    bins = (steps - first) // width
    starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
    return bins[starts], np.maximum.reduceat(values, starts), steps[starts]


def _step_range(run_data):
    """(first, last, stored step count) over the layer and global series, or None."""
    series = [run_data.series[tags.layer_tag(path)] for path in run_data.layers
              if tags.layer_tag(path) in run_data.series]
    if tags.GLOBAL in run_data.series:
        series.append(run_data.series[tags.GLOBAL])
    series = [(steps, values) for steps, values in series if steps.size]
    if not series:
        return None
    first = min(int(steps[0]) for steps, _ in series)
    last = max(int(steps[-1]) for steps, _ in series)
    stored = run_data.series.get(tags.GLOBAL, (np.zeros(0),))[0].size
    stored = max([stored] + [steps.size for steps, _ in series])
    return first, last, stored


def _log10_range(matrix):
    """[lowest, highest] log10 of the finite positive cells, or None."""
    positive = matrix[np.isfinite(matrix) & (matrix > 0)]
    if positive.size == 0:
        return None
    return [float(np.log10(positive.min())), float(np.log10(positive.max()))]


def heatmap_view(run_data, columns):
    """Layers x step bins of max norm, as base64 little-endian float32 (row-major).

    Cells: the bin's max norm; NaN / +Inf if one occurred; `MISSING` if no sample.
    """
    step_range = _step_range(run_data)
    if step_range is None or not run_data.layers:
        return {"layers": [], "columns": 0, "empty": True}
    first, last, stored = step_range
    shown = run_data.layers[:MAX_ROWS]
    asked = columns
    columns = max(1, min(columns, MAX_CELLS // len(shown)))
    width, count = step_grid(first, last, columns, stored)
    matrix = np.full((len(shown), count), MISSING, dtype=np.float32)
    for row, path in enumerate(shown):
        steps, values = run_data.series.get(tags.layer_tag(path), (np.zeros(0, np.int64), None))
        bins, maxima, _ = max_per_bin(steps, values, first, width)
        matrix[row, bins] = maxima
    return {
        "layers": [records.short_name(path) for path in shown],
        "layers_total": len(run_data.layers),
        "layers_capped": len(shown) < len(run_data.layers),
        "columns_capped": columns < asked,
        "first_step": first,
        "last_step": last,
        "bin_width": width,
        "columns": count,
        "stored_steps": stored,
        "sampled": stored < last - first + 1,
        "log10_range": _log10_range(matrix),
        "cells": base64.b64encode(matrix.astype("<f4").tobytes()).decode("ascii"),
        "empty": False,
    }


def _binned_line(run_data, tag, first, width):
    """{"steps", "values"} of `tag` binned by max (step = first stored step of the bin)."""
    if tag not in run_data.series:
        return None
    steps, values = run_data.series[tag]
    _, maxima, bin_steps = max_per_bin(steps, values, first, width)
    return {"steps": bin_steps.tolist(), "values": maxima.astype(float).tolist()}


def flagged_steps(run_data, tag):
    """Steps at which the 0/1 series `tag` is set."""
    if tag not in run_data.series:
        return []
    steps, values = run_data.series[tag]
    return steps[values > 0.5].tolist()


def clipping_spans(clip_steps, reference_steps):
    """[[start, end], ...]: runs of steps with clipping on.

    `clip_steps` (sorted) are steps holding a clip threshold; two neighbours
    belong to one span unless a stored reference step lies between them (a
    step seen without clipping). Robust to TensorBoard's sampling.
    """
    if clip_steps.size == 0:
        return []
    seen_between = (np.searchsorted(reference_steps, clip_steps[1:], side="left")
                    - np.searchsorted(reference_steps, clip_steps[:-1], side="right"))
    breaks = np.flatnonzero(seen_between > 0)
    starts = np.r_[0, breaks + 1]
    ends = np.r_[breaks, clip_steps.size - 1]
    return [[int(clip_steps[s]), int(clip_steps[e])] for s, e in zip(starts, ends)]


def _spans(run_data, last):
    if tags.CLIP_THRESHOLD in run_data.series:
        steps, values = run_data.series[tags.CLIP_THRESHOLD]
        reference = run_data.series.get(tags.GLOBAL, (np.zeros(0, np.int64),))[0]
        return clipping_spans(steps[np.isfinite(values)], reference)
    starts = sorted({record["step"] for record in run_data.clipping})
    return [[start, last] for start in starts[:1]]


def global_view(run_data, points):
    """Global norm (pre- and post-clip), thresholds, explosion markers, clipping spans."""
    step_range = _step_range(run_data)
    if step_range is None:
        return {"empty": True}
    first, last, stored = step_range
    width, _ = step_grid(first, last, points, stored)
    explosions = set(flagged_steps(run_data, tags.EXPLOSION))
    explosions.update(record["step"] for record in run_data.explosions)
    return {
        "empty": False,
        "first_step": first,
        "last_step": last,
        "bin_width": width,
        "sampled": stored < last - first + 1,
        "pre_clip": _binned_line(run_data, tags.GLOBAL, first, width),
        "post_clip": _binned_line(run_data, tags.GLOBAL_CLIPPED, first, width),
        "threshold": _binned_line(run_data, tags.THRESHOLD, first, width),
        "clip_threshold": _binned_line(run_data, tags.CLIP_THRESHOLD, first, width),
        "explosion_steps": sorted(explosions),
        "overflow_steps": flagged_steps(run_data, tags.OVERFLOW),
        "clipping_spans": _spans(run_data, last),
    }


def _value_at(run_data, tag, step):
    """Stored value of `tag` at exactly `step`, or None."""
    steps, values = run_data.series.get(tag, (np.zeros(0, np.int64), None))
    index = int(np.searchsorted(steps, step))
    if index < steps.size and steps[index] == step:
        return float(values[index])
    return None


def _alert_row(record):
    return {
        "step": record["step"],
        "epoch": record.get("epoch"),
        "global_norm": record.get("global_norm"),
        "threshold": record.get("threshold"),
        "top_layers": record.get("layers", [])[:TOP_LAYERS_PER_ALERT],
        "layer_count": record.get("layer_count", 0),
        "action": record.get("action"),
        "culprits": record.get("culprits"),
        "culprits_summary": record.get("culprits_summary"),
        "batch_size": record.get("batch_size"),
    }


def alerts_view(run_data, limit):
    """Explosion rows by step (the first `limit`); from the scalars if no records were written."""
    if run_data.explosions:
        rows = [_alert_row(record) for record in run_data.explosions]
    else:
        rows = [
            _alert_row({"step": step,
                        "global_norm": _value_at(run_data, tags.GLOBAL, step),
                        "threshold": _value_at(run_data, tags.THRESHOLD, step)})
            for step in flagged_steps(run_data, tags.EXPLOSION)
        ]
    return {"alerts": rows[:limit], "total": len(rows), "clipping": run_data.clipping[:limit]}


def _layer_stats(path, steps_values, times_top):
    values = steps_values[1].astype(np.float64)
    finite = values[np.isfinite(values)]
    peak = float(finite.max()) if finite.size else None
    median = float(np.median(finite)) if finite.size else None
    return {
        "layer": records.short_name(path),
        "times_top": times_top,
        "nonfinite": int(values.size - finite.size),
        "peak": peak,
        "median": median,
        "peak_over_median": (peak / median) if peak is not None and median else None,
    }


def ranking_view(run_data, limit):
    """Layers ranked by alerts led (largest norm at an explosion), then non-finite count, then peak."""
    times_top = {}
    for record in run_data.explosions:
        layers = record["layers"]
        if layers:
            times_top[layers[0][0]] = times_top.get(layers[0][0], 0) + 1
    rows = [
        _layer_stats(path, run_data.series[tags.layer_tag(path)], times_top.get(records.short_name(path), 0))
        for path in run_data.layers if tags.layer_tag(path) in run_data.series
    ]
    rows.sort(key=lambda row: (-row["times_top"], -row["nonfinite"], -(row["peak"] or 0.0)))
    return {"layers": rows[:limit], "total": len(rows)}

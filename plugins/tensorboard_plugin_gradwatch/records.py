"""Cleaning the JSON records of hand-made or damaged files before the routes serve them.

A record keeps only the keys the dashboard uses, each of the expected type
(anything else becomes None, or drops the record if its `step` is not an
integer); names are cut to `MAX_NAME_CHARS` and a record's layer list to
`MAX_LAYER_PAIRS`, so responses stay bounded whatever a file holds.
"""

import math

from gradwatch import tags
from gradwatch.summaries import json_safe

MAX_NAME_CHARS = 512
MAX_LAYER_PAIRS = 1000
_MODE_CHARS = 64


def short_name(name):
    """`name` cut to `MAX_NAME_CHARS` (an ellipsis marks the cut)."""
    return name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS - 1] + "\u2026"


def _int(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63 else None


def _number(value):
    """A float (non-finite as "nan"/"inf"/"-inf"), from a number or its string spelling; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return json_safe(value)
        except OverflowError:
            return None
    if isinstance(value, str) and len(value) <= 10:
        try:
            number = float(value)
        except ValueError:
            return None
        return json_safe(number) if not math.isfinite(number) else None
    return None


def _pair(item):
    if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
        return [short_name(item[0]), _number(item[1])]
    return None


def explosion(record):
    """A clean explosion record, or None if it has no integer `step`."""
    if not isinstance(record, dict) or _int(record.get("step")) is None:
        return None
    layers = record.get("layers")
    pairs = [pair for pair in map(_pair, layers if isinstance(layers, list) else []) if pair is not None]
    action = record.get("action")
    return {
        "step": record["step"],
        "epoch": _int(record.get("epoch")),
        "global_norm": _number(record.get("global_norm")),
        "threshold": _number(record.get("threshold")),
        "layers": pairs[:MAX_LAYER_PAIRS],
        "layer_count": len(pairs),
        "action": action if isinstance(action, str) and action in tags.ACTIONS else None,
    }


def clipping(record):
    """A clean clipping event, or None if it has no integer `step`."""
    if not isinstance(record, dict) or _int(record.get("step")) is None:
        return None
    mode = record.get("mode")
    return {
        "step": record["step"],
        "epoch": _int(record.get("epoch")),
        "mode": mode[:_MODE_CHARS] if isinstance(mode, str) else None,
        "threshold": _number(record.get("threshold")),
        "cause_step": _int(record.get("cause_step")),
    }

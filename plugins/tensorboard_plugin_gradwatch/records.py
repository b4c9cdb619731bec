"""Cleaning the JSON records of hand-made or damaged files before the routes serve them.

A record keeps only the keys the dashboard uses, each of the expected type
(anything else becomes None, or drops the record if its `step` is not an
integer); names are cut to `MAX_NAME_CHARS` and a record's layer list to
`MAX_LAYER_PAIRS`, so responses stay bounded whatever a file holds.
"""

import re
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
        "culprits": _culprits(record.get("culprits")),
        "culprits_summary": _text(record.get("culprits_summary"), _SUMMARY_CHARS),
        "batch_size": _int(record.get("batch_size")),
    }


# Culprits (issue 25; `gradwatch.culprits.store`): what is read of an explosion's
# ranked samples and their previews. Anything else is dropped.
MAX_CULPRITS_SHOWN = 10
_SUMMARY_CHARS = 300
_PREVIEW_INPUTS = 4
_PREVIEW_VALUES = 16
_PNG_CHARS = 64 * 1024
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_PNG_BASE64_START = "iVBORw0KGgo"  # the PNG signature, base64


def _text(value, limit):
    return value[:limit] if isinstance(value, str) else None


def _numbers(values):
    if not isinstance(values, list):
        return None
    return [_number(v) for v in values[:_PREVIEW_VALUES]]


def _preview_input(item):
    if not isinstance(item, dict):
        return None
    name = _text(item.get("name"), 100) or ""
    if item.get("kind") == "image":
        png = item.get("png")
        if (isinstance(png, str) and len(png) <= _PNG_CHARS and png.startswith(_PNG_BASE64_START)
                and _BASE64.fullmatch(png)):
            return {"name": name, "kind": "image", "png": png}
        return None
    if item.get("kind") == "values":
        values = _numbers(item.get("values"))
        shape = item.get("shape")
        shape = [d for d in shape[:8] if _int(d) is not None] if isinstance(shape, list) else []
        return {"name": name, "kind": "values", "values": values or [], "shape": shape}
    return None


def _preview(value):
    if not isinstance(value, dict):
        return None
    inputs = value.get("inputs")
    inputs = [p for p in map(_preview_input, inputs[:_PREVIEW_INPUTS] if isinstance(inputs, list) else [])
              if p is not None]
    return {"inputs": inputs, "target": _numbers(value.get("target"))}


def _culprits(value):
    """The first `MAX_CULPRITS_SHOWN` ranked samples, cleaned, or None."""
    if not isinstance(value, list):
        return None
    found = []
    for item in value[:MAX_CULPRITS_SHOWN]:
        if not isinstance(item, dict) or _int(item.get("index")) is None:
            continue
        found.append({"index": item["index"], "loss": _number(item.get("loss")),
                      "grad_norm": _number(item.get("grad_norm")), "share": _number(item.get("share")),
                      "preview": _preview(item.get("preview"))})
    return found


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
        "restarted": record.get("restarted") is True,
        "restart_step": _int(record.get("restart_step")) if record.get("restarted") is True else None,
    }

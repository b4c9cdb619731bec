"""What `gradwatch.logs` reads back for a run: its series and records.

Explosion records (`gradwatch/explosions`, JSON) are read with these keys, any
other key is ignored and a missing one becomes None: `step`, `epoch`,
`global_norm`, `threshold`, `layers` (`[[layer path, norm], ...]`, largest
first), `action` (one of `gradwatch.tags.ACTIONS`), `nonfinite`, and where a
batch was kept `culprits` (`[{"index", "loss", "grad_norm", "share"}, ...]`),
`culprits_summary`, `batch_size`, `culprits_arrays`. Clipping
events (`gradwatch/clipping`) are read with `step`, `epoch`, `mode`,
`threshold`, `cause_step`. Vanishing / dead-gradient records
(`gradwatch/vanishing`) with `step`, `epoch`, `kind`, `layers`
(`[[layer path, norm], ...]`), `detail`. Numbers written as the strings "nan", "inf", "-inf"
come back as floats.
"""

import dataclasses
import json
import math

import numpy as np

# JSON records larger or deeper than this are refused when read (a record the
# monitor writes is a flat list of small objects: depth 4).
MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class Series:
    """One scalar series: sorted unique `steps` (int64) and their `values`."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self):
        return len(self.steps)


@dataclasses.dataclass(frozen=True)
class Explosion:
    """One exploding step, as the monitor recorded it."""

    step: int
    global_norm: float
    threshold: float = None
    epoch: int = None
    layers: tuple = ()  # ((layer path, norm), ...), largest first
    action: str = None
    nonfinite: bool = False  # the gradient held NaN or Inf
    # The ranked samples of the kept batch (`gradwatch.culprits.store`): a tuple of
    # `{"index", "loss", "grad_norm", "share"}` dicts, or None where none was kept.
    culprits: tuple = None
    culprits_summary: str = None
    batch_size: int = None
    culprits_arrays: str = None  # the arrays file, relative to the run folder (culprits=True)

    @property
    def leading_layer(self):
        """The layer with the largest norm at this step, or None."""
        return self.layers[0][0] if self.layers else None


@dataclasses.dataclass(frozen=True)
class ClippingEvent:
    """Clipping switched on at `step` with `mode` and `threshold`."""

    step: int
    mode: str = None
    threshold: float = None
    epoch: int = None
    cause_step: int = None  # the explosion that switched clipping on
    restarted: bool = False  # the weights went back to those kept (`AutoThreshold.restart_steps`, `rollback_steps`)
    restart_step: int = None  # ... those before this step (1: the first step); None if unknown or not restarted


@dataclasses.dataclass(frozen=True)
class VanishingRecord:
    """Layers whose gradient started vanishing (`kind` "vanishing") or died ("dead") at `step`."""

    step: int
    kind: str
    epoch: int = None
    layers: tuple = ()  # ((layer path, norm at that step), ...), model order
    detail: tuple = ()  # per layer: depth gap in orders of magnitude, or zero steps in a row


@dataclasses.dataclass(frozen=True)
class RunData:
    """Everything gradwatch wrote for one run."""

    name: str
    path: str
    global_norm: Series
    layer_norms: dict  # layer path -> Series, in model order
    explosions: tuple = ()
    clipping: tuple = ()
    vanishing: tuple = ()  # VanishingRecord, by step
    other_series: dict = dataclasses.field(default_factory=dict)  # reserved tag -> Series
    notes: tuple = ()  # what was skipped while reading (a truncated tail, a refused record)

    @property
    def first_step(self):
        return int(self.global_norm.steps[0]) if len(self.global_norm) else None

    @property
    def last_step(self):
        return int(self.global_norm.steps[-1]) if len(self.global_norm) else None

    @property
    def step_count(self):
        return len(self.global_norm)


def json_nesting(raw):
    """Deepest nesting of `[`/`{` in JSON bytes outside strings, in linear time (numpy)."""
    text = np.frombuffer(raw, np.uint8)
    if text.size == 0:
        return 0
    positions = np.arange(text.size, dtype=np.int32)
    last_plain = np.maximum.accumulate(np.where(text != 0x5C, positions, -1))  # not a backslash
    quotes = np.flatnonzero(text == 0x22)
    before = np.maximum(quotes - 1, 0)
    backslashes = np.where(quotes > 0, quotes - 1 - last_plain[before], 0)
    toggles = np.zeros(text.size, np.int32)
    toggles[quotes[backslashes % 2 == 0]] = 1  # unescaped quotes open and close strings
    outside = (np.cumsum(toggles, dtype=np.int32) & 1) == 0
    steps = (outside & ((text == 0x5B) | (text == 0x7B))).astype(np.int32) - (
        outside & ((text == 0x5D) | (text == 0x7D))).astype(np.int32)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


class RefusedRecord(ValueError):
    """A JSON record refused before parsing: too large or too deeply nested."""


def parse_json_record(raw):
    """The JSON document in `raw` (bytes or str).

    Raises `RefusedRecord` if it is larger than `MAX_JSON_BYTES` or nested
    deeper than `MAX_JSON_DEPTH` (checked before parsing, so no deep
    recursion anywhere later), and `ValueError` if it is not JSON.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if not isinstance(raw, bytes):
        raise ValueError(f"not a string but {type(raw).__name__}")
    if len(raw) > MAX_JSON_BYTES:
        raise RefusedRecord(f"{len(raw)} bytes, more than {MAX_JSON_BYTES}")
    depth = json_nesting(raw)
    if depth > MAX_JSON_DEPTH:
        raise RefusedRecord(f"nested {depth} deep, more than {MAX_JSON_DEPTH}")
    return json.loads(raw.decode("utf-8"))


def to_float(value):
    """A JSON number or "nan"/"inf"/"-inf" string as a float; None stays None."""
    if value is None:
        return None
    return float(value)  # float("nan"), float("inf") and float("-inf") parse


def _optional_int(value):
    return None if value is None else int(value)


def explosion_from_doc(event_step, doc):
    """The `Explosion` of one `gradwatch/explosions` record written at `event_step`."""
    norm = to_float(doc.get("global_norm", math.nan))
    return Explosion(
        step=int(doc.get("step", event_step)),
        global_norm=norm,
        threshold=to_float(doc.get("threshold")),
        epoch=_optional_int(doc.get("epoch")),
        layers=tuple((str(name), to_float(value)) for name, value in doc.get("layers") or ()),
        action=doc.get("action"),
        nonfinite=bool(doc.get("nonfinite", not math.isfinite(norm))),
        culprits=_culprits(doc.get("culprits")),
        culprits_summary=_short_text(doc.get("culprits_summary")),
        batch_size=_optional_int(doc.get("batch_size")),
        culprits_arrays=_short_text(doc.get("culprits_arrays")),
    )


# At most this many culprits of one explosion are read back (the monitor writes 64).
MAX_CULPRITS = 1024


def _culprits(docs):
    """The ranking of an explosion record, or None (anything but a list of objects is refused)."""
    if docs is None:
        return None
    if not isinstance(docs, list):
        raise ValueError("culprits is not a list")
    return tuple({"index": int(d["index"]), "loss": to_float(d.get("loss")),
                  "grad_norm": to_float(d.get("grad_norm")), "share": to_float(d.get("share"))}
                 for d in docs[:MAX_CULPRITS])


def _short_text(value, limit=500):
    return None if value is None else str(value)[:limit]


def vanishing_from_doc(event_step, doc):
    """The `VanishingRecord` of one `gradwatch/vanishing` record written at `event_step`."""
    return VanishingRecord(
        step=int(doc.get("step", event_step)),
        kind=str(doc["kind"]),
        epoch=_optional_int(doc.get("epoch")),
        layers=tuple((str(name), to_float(value)) for name, value in doc.get("layers") or ()),
        detail=tuple(to_float(value) for value in doc.get("detail") or ()),
    )


def clipping_event_from_doc(event_step, doc):
    """The `ClippingEvent` of one `gradwatch/clipping` record written at `event_step`."""
    return ClippingEvent(
        step=int(doc.get("step", event_step)),
        mode=doc.get("mode"),
        threshold=to_float(doc.get("threshold")),
        epoch=_optional_int(doc.get("epoch")),
        cause_step=_optional_int(doc.get("cause_step")),
        restarted=doc.get("restarted") is True,
        restart_step=_optional_int(doc.get("restart_step")) if doc.get("restarted") is True else None,
    )

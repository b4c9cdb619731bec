"""Reading gradwatch data back from TensorBoard event files.

Shared by `gradwatch report` (and usable by the TensorBoard plugin). Files are
read whole and exactly -- every record, no reservoir sampling -- with a small
pure-Python TFRecord reader, so importing this module or reading logs never
imports TensorFlow. Record framing is checked (lengths and their CRC32C); a
truncated or garbled file raises `LogReadError` instead of being cut short
silently, as TensorBoard's own loader does. Payload checksums are not verified
(pure-Python CRC32C would dominate the read time); a payload that no longer
parses as an `Event` is reported as corrupt.

A *run* is a folder under LOGDIR (LOGDIR itself included, named ".") that
directly holds `events.out.tfevents.*` files with gradwatch data: a
`grad_norm/global` value or any `gradwatch/*` tag. Run names are the folder
paths relative to LOGDIR with "/" separators. Symbolic links are followed only
while they stay inside LOGDIR; each real folder is read once.

Several event files in one run are read in file-name (creation) order. When a
step appears more than once (a run resumed from a checkpoint), the value written
last wins, for scalar series and for explosion and clipping records alike.

Explosion records (`gradwatch/explosions`, JSON) are read with these keys, any
other key is ignored and a missing one becomes None: `step`, `epoch`,
`global_norm`, `threshold`, `layers` (`[[layer path, norm], ...]`, largest
first), `action` (one of `gradwatch.tags.ACTIONS`), `nonfinite`. Clipping
events (`gradwatch/clipping`) are read with `step`, `epoch`, `mode`,
`threshold`, `cause_step`. Numbers written as the strings "nan", "inf", "-inf"
come back as floats. A record that is not of this shape raises `LogReadError`.

Scalars are kept as numpy arrays (layer norms as float32, as written; tags
written together share one steps array): a 100k-step x 200-layer run takes
about 100 MB and reads in seconds.
"""

import array
import dataclasses
import json
import math
import os
import struct

import numpy as np

from gradwatch import tags

__all__ = [
    "ClippingEvent", "Explosion", "LogReadError", "RunData", "Series",
    "find_event_folders", "read_logdir", "read_run",
]

EVENT_FILE_PREFIX = "events.out.tfevents."
_GRADWATCH_JSON_TAGS = (tags.LAYERS, tags.EXPLOSIONS, tags.CLIPPING)
_PLUGIN_TAG_PREFIX = tags.PLUGIN_NAME + "/"  # gradwatch/layers, gradwatch/alerts, ...


class LogReadError(Exception):
    """An event file could not be read: truncated, garbled or unreadable."""

    def __init__(self, path, reason):
        super().__init__(f"Cannot read event file {path!r}: {reason}.")
        self.path = path
        self.reason = reason


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data):
    """TFRecord's masked CRC32C (Castagnoli) of `data`."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_HEADER = struct.Struct("<QI")  # record length, masked CRC32C of the length


def iter_records(path):
    """Yields `(byte offset, payload)` of each TFRecord in the file at `path`."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        offset = 0
        while header := stream.read(_HEADER.size):
            if len(header) < _HEADER.size:
                raise LogReadError(path, f"truncated record header at byte {offset}")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise LogReadError(
                    path, f"corrupt record at byte {offset} (bad length checksum; "
                    "is it a TensorBoard event file?)")
            if length + 4 > size - stream.tell():  # never allocate more than the file holds
                size = os.fstat(stream.fileno()).st_size  # it may be growing
                if length + 4 > size - stream.tell():
                    raise LogReadError(path, f"truncated record at byte {offset}")
            payload = stream.read(length + 4)  # data, then its masked CRC32C
            if len(payload) < length + 4:
                raise LogReadError(path, f"truncated record at byte {offset}")
            yield offset, payload[:length]
            offset += _HEADER.size + length + 4


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


@dataclasses.dataclass(frozen=True)
class RunData:
    """Everything gradwatch wrote for one run."""

    name: str
    path: str
    global_norm: Series
    layer_norms: dict  # layer path -> Series, in model order
    explosions: tuple = ()
    clipping: tuple = ()
    other_series: dict = dataclasses.field(default_factory=dict)  # reserved tag -> Series

    @property
    def first_step(self):
        return int(self.global_norm.steps[0]) if len(self.global_norm) else None

    @property
    def last_step(self):
        return int(self.global_norm.steps[-1]) if len(self.global_norm) else None

    @property
    def step_count(self):
        return len(self.global_norm)


def to_float(value):
    """A JSON number or "nan"/"inf"/"-inf" string as a float; None stays None."""
    if value is None:
        return None
    return float(value)  # float("nan"), float("inf") and float("-inf") parse


def _is_inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _event_files(dirpath, filenames, root):
    """Event files directly in `dirpath` whose real location is inside `root`."""
    found = []
    for name in sorted(filenames):
        full = os.path.join(dirpath, name)
        if name.startswith(EVENT_FILE_PREFIX) and _is_inside(os.path.realpath(full), root):
            if os.path.isfile(full):
                found.append(full)
    return found


def find_event_folders(logdir):
    """Yields `(run name, [event file paths])` for folders under `logdir`."""
    root = os.path.realpath(logdir)
    visited = set()
    for dirpath, dirnames, filenames in os.walk(logdir, followlinks=True):
        real = os.path.realpath(dirpath)
        if not _is_inside(real, root) or real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        # Real folders before symbolic links to them, so runs keep their real names.
        dirnames.sort(key=lambda name: (os.path.islink(os.path.join(dirpath, name)), name))
        files = _event_files(dirpath, filenames, root)
        if files:
            name = os.path.relpath(dirpath, logdir).replace(os.sep, "/")
            yield name, files


# -- wire-level fast path -----------------------------------------------------
# Parsing every `Summary.Value` into Python costs microseconds per number; a
# 100k-step x 200-layer run holds 20M of them. Events whose summaries have the
# same bytes once their float32 numbers are masked out share a `_Layout`: their
# numbers are gathered with numpy, and the event is not parsed again.


def _varint_at(buf, pos):
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start, end):
    """Yields `(field number, wire type, start, end)` of a message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint_at(buf, pos)
        wire = key & 7
        if wire == 0:
            nxt = _varint_at(buf, pos)[1]
        elif wire == 2:
            length, pos = _varint_at(buf, pos)
            nxt = pos + length
        elif wire in (1, 5):
            nxt = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError("unsupported wire type")
        yield key >> 3, wire, pos, nxt
        pos = nxt
    if pos != end:
        raise ValueError("field overruns its message")


def _tensor_number_at(buf, start, end):
    """Offset of the float32 of a rank-0 DT_FLOAT `TensorProto`, or None."""
    offset, dtype = None, None
    for number, wire, lo, hi in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dtype = _varint_at(buf, lo)[0]
        elif number in (4, 5) and hi - lo == 4 and offset is None:  # tensor_content, float_val
            offset = lo
        elif not (number == 2 and hi == lo) and number != 3:  # empty shape, version
            return None
    return offset if dtype == 1 else None


def _value_number_at(buf, start, end):
    """`(tag, offset of its float32)` of a `Summary.Value`; offset None if it has none."""
    tag, offset = None, None
    for number, wire, lo, hi in _fields(buf, start, end):
        if number == 1:
            tag = buf[lo:hi].decode("utf-8")
        elif number == 2 and wire == 5:  # simple_value
            offset = lo
        elif number == 8 and wire == 2:
            offset = _tensor_number_at(buf, lo, hi)
        elif number != 9:  # metadata
            return tag, None
    return tag, offset


def _summary_of(payload):
    """`(step, summary bytes)` of a plain `Event`, or None for any other event."""
    step, summary = None, None
    for number, wire, lo, hi in _fields(payload, 0, len(payload)):
        if number == 2 and wire == 0:
            step = _varint_at(payload, lo)[0]
        elif number == 5 and wire == 2:
            summary = payload[lo:hi]
        elif number != 1:
            return None
    if step is None or summary is None or step >= 1 << 63:
        return None
    return step, summary


class _Layout:
    """Events whose summaries hold float32 numbers at the same byte offsets."""

    def __init__(self, summary, offsets, kept_tags, kept_offsets):
        self.number_bytes = (np.asarray(offsets, np.intp)[:, None] + np.arange(4)).ravel()
        self.kept_bytes = (np.asarray(kept_offsets, np.intp)[:, None] + np.arange(4)).ravel()
        self.kept_tags = kept_tags
        self.masked = self._masked(np.frombuffer(summary, np.uint8))
        self.steps, self.values = array.array("q"), bytearray()

    def _masked(self, buf):
        buf = buf.copy()
        buf[self.number_bytes] = 0
        return buf.tobytes()

    def add(self, step, summary):
        """Appends the event if it has this layout; says whether it had."""
        buf = np.frombuffer(summary, np.uint8)
        if self._masked(buf) != self.masked:
            return False
        self.steps.append(step)
        self.values += buf[self.kept_bytes].tobytes()
        return True

    def flush(self, parts):
        """Moves the rows gathered so far into `parts` (tag -> [(steps, values)])."""
        if not self.steps:
            return
        steps = np.array(self.steps, dtype=np.int64)
        rows = np.frombuffer(self.values, "<f4").reshape(len(steps), len(self.kept_tags))
        for column, tag in enumerate(self.kept_tags):
            parts.setdefault(tag, []).append((steps, rows[:, column].copy()))
        self.steps, self.values = array.array("q"), bytearray()


def _layout_of(summary):
    """A `_Layout` for `summary` if all its values are float32 scalars, else None."""
    offsets, kept_tags, kept_offsets = [], [], []
    for number, wire, lo, hi in _fields(summary, 0, len(summary)):
        tag, offset = _value_number_at(summary, lo, hi) if number == 1 else (None, None)
        if tag is None or offset is None:
            return None
        offsets.append(offset)
        if tag.startswith(tags.PREFIX):
            kept_tags.append(tag)
            kept_offsets.append(offset)
    return _Layout(summary, offsets, kept_tags, kept_offsets) if offsets else None


# -- reading a run ---------------------------------------------------------------


class _RunReader:
    """Collects one run's values while its event files are parsed in order."""

    _MAX_LAYOUTS = 64

    def __init__(self):
        self.parts = {}  # tag -> [(steps, values)] in write order
        self.json_docs = {tag: [] for tag in _GRADWATCH_JSON_TAGS}  # tag -> [(step, doc)]
        self.layouts = {}  # summary length -> [_Layout]
        self.columns = {}  # tag -> (steps, values) of slowly parsed events
        self.other_plugin_data = False  # e.g. gradwatch/alerts text

    def read_file(self, path):
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto import event_pb2

        for offset, payload in iter_records(path):
            if self._add_fast(payload):
                continue
            try:
                event = event_pb2.Event.FromString(payload)
            except DecodeError:
                raise LogReadError(path, f"corrupt event record at byte {offset}")
            self._add_slow(path, event, payload)
        for layouts in self.layouts.values():
            for layout in layouts:
                layout.flush(self.parts)
        for tag, (steps, values) in self.columns.items():
            self.parts.setdefault(tag, []).append(
                (np.array(steps, np.int64), np.array(values, np.float64)))
        self.columns = {}

    def _add_fast(self, payload):
        try:
            found = _summary_of(payload)
        except (IndexError, ValueError):
            return False
        if found is None:
            return False
        step, summary = found
        return any(layout.add(step, summary) for layout in self.layouts.get(len(summary), ()))

    def _add_slow(self, path, event, payload):
        if self._new_layout(payload):
            return
        step = event.step
        for value in event.summary.value:
            tag = value.tag
            if tag in self.json_docs:
                self.json_docs[tag].append((step, _parse_json(path, tag, step, value)))
            elif tag.startswith(_PLUGIN_TAG_PREFIX):
                self.other_plugin_data = True
            elif tag.startswith(tags.PREFIX):
                number = _scalar_of(value)
                if number is not None:
                    steps, values = self.columns.setdefault(
                        tag, (array.array("q"), array.array("d")))
                    steps.append(step)
                    values.append(number)

    def _new_layout(self, payload):
        """Adds a layout for this well-formed event if it has one; says if it did."""
        if sum(map(len, self.layouts.values())) >= self._MAX_LAYOUTS:
            return False
        try:
            step, summary = _summary_of(payload)
            layout = _layout_of(summary)
        except (IndexError, TypeError, UnicodeDecodeError, ValueError):
            return False
        if layout is None or not layout.kept_tags:
            return False
        self.layouts.setdefault(len(summary), []).append(layout)
        return layout.add(step, summary)

    @property
    def has_gradwatch_data(self):
        return (tags.GLOBAL in self.parts or any(self.json_docs.values())
                or self.other_plugin_data)


def _scalar_of(value):
    """The float held by a `Summary.Value`, or None if it holds no number."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return value.simple_value
    if kind != "tensor":
        return None
    tensor = value.tensor
    if tensor.float_val:
        return tensor.float_val[0]
    if tensor.double_val:
        return tensor.double_val[0]
    if tensor.tensor_content and tensor.dtype in _CONTENT_FORMATS:
        content_format = _CONTENT_FORMATS[tensor.dtype]
        if len(tensor.tensor_content) >= struct.calcsize(content_format):
            return struct.unpack_from(content_format, tensor.tensor_content)[0]
    return None


_CONTENT_FORMATS = {1: "<f", 2: "<d"}  # DT_FLOAT, DT_DOUBLE


def _parse_json(path, tag, step, value):
    strings = value.tensor.string_val
    if not strings:
        raise LogReadError(path, f"tag {tag!r} at step {step} holds no JSON string")
    try:
        return json.loads(strings[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # deep nesting too
        raise LogReadError(path, f"malformed JSON in tag {tag!r} at step {step} ({error})")


def _series(parts, dtype, shared_steps):
    """A `Series` of `parts` sorted by step; of equal steps the last written wins.

    Tags written together share one steps array, through `shared_steps`.
    """
    if not parts:
        return Series(np.zeros(0, np.int64), np.zeros(0, dtype))
    key = tuple(id(steps) for steps, _ in parts)
    if key not in shared_steps:
        shared_steps[key] = np.concatenate([steps for steps, _ in parts])
    steps = shared_steps[key]
    values = np.concatenate([values for _, values in parts])
    values = values.astype(dtype, copy=False)
    if len(steps) > 1 and not np.all(steps[1:] > steps[:-1]):
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        keep_last = np.append(steps[1:] != steps[:-1], True)
        steps, values = steps[keep_last], values[keep_last]
    return Series(steps=steps, values=values)


def _last_per_step(records):
    """Records sorted by step; of records sharing a step, the last written."""
    by_step = {}
    for record in records:
        by_step[record.step] = record
    return tuple(by_step[step] for step in sorted(by_step))


def _optional_int(value):
    return None if value is None else int(value)


def _explosion(event_step, doc):
    norm = to_float(doc.get("global_norm", math.nan))
    return Explosion(
        step=int(doc.get("step", event_step)),
        global_norm=norm,
        threshold=to_float(doc.get("threshold")),
        epoch=_optional_int(doc.get("epoch")),
        layers=tuple((str(name), to_float(value)) for name, value in doc.get("layers") or ()),
        action=doc.get("action"),
        nonfinite=bool(doc.get("nonfinite", not math.isfinite(norm))),
    )


def _clipping_event(event_step, doc):
    return ClippingEvent(
        step=int(doc.get("step", event_step)),
        mode=doc.get("mode"),
        threshold=to_float(doc.get("threshold")),
        epoch=_optional_int(doc.get("epoch")),
        cause_step=_optional_int(doc.get("cause_step")),
    )


def _records(path, tag, docs, make):
    try:
        return _last_per_step(make(step, doc) for step, batch in docs for doc in batch)
    except (AttributeError, KeyError, OverflowError, TypeError, ValueError) as error:
        raise LogReadError(path, f"unexpected record format in tag {tag!r} ({error!r})")


def _layer_order(written, seen):
    """Layer paths: the last `gradwatch/layers` order first, then as first seen."""
    seen = [layer for layer in seen if layer is not None]
    lists = [doc for _, doc in written if isinstance(doc, list)]  # anything else is ignored
    listed = [str(layer) for layer in lists[-1]] if lists else []
    return [layer for layer in listed if layer in seen] + [
        layer for layer in seen if layer not in listed]


def read_run(name, event_files):
    """`RunData` of one run folder's event files, or None without gradwatch data."""
    reader = _RunReader()
    for path in event_files:
        try:
            reader.read_file(path)
        except OSError as error:
            raise LogReadError(path, error.strerror or str(error))
    if not reader.has_gradwatch_data:
        return None
    parts, docs = reader.parts, reader.json_docs
    where = os.path.dirname(event_files[0])
    layers = _layer_order(docs[tags.LAYERS], [tags.layer_of_tag(tag) for tag in parts])
    shared = {}
    return RunData(
        name=name,
        path=where,
        global_norm=_series(parts.pop(tags.GLOBAL, []), np.float64, shared),
        # Layer norms are float32 in the files: keep them compact.
        layer_norms={layer: _series(parts.pop(tags.layer_tag(layer)), np.float32, shared)
                     for layer in layers},
        explosions=_records(where, tags.EXPLOSIONS, docs[tags.EXPLOSIONS], _explosion),
        clipping=_records(where, tags.CLIPPING, docs[tags.CLIPPING], _clipping_event),
        other_series={tag: _series(tag_parts, np.float64, shared) for tag, tag_parts in parts.items()},
    )


def read_logdir(logdir):
    """`RunData` of every run with gradwatch data under `logdir`, by run name.

    Raises `FileNotFoundError` / `NotADirectoryError` for a bad `logdir` and
    `LogReadError` for an unreadable event file.
    """
    if not os.path.exists(logdir):
        raise FileNotFoundError(logdir)
    if not os.path.isdir(logdir):
        raise NotADirectoryError(logdir)
    runs = (read_run(name, files) for name, files in find_event_folders(logdir))
    return [run for run in runs if run is not None]

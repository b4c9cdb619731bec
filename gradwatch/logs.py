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
first), `action` (one of `gradwatch.tags.ACTIONS`). Clipping events
(`gradwatch/clipping`) are read with `step`, `mode` and `threshold`. Numbers
written as the strings "nan", "inf", "-inf" come back as floats.
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
        offset = 0
        while header := stream.read(_HEADER.size):
            if len(header) < _HEADER.size:
                raise LogReadError(path, f"truncated record header at byte {offset}")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise LogReadError(
                    path, f"corrupt record at byte {offset} (bad length checksum; "
                    "is it a TensorBoard event file?)")
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
        dirnames.sort()
        files = _event_files(dirpath, filenames, root)
        if files:
            name = os.path.relpath(dirpath, logdir).replace(os.sep, "/")
            yield name, files


class _Accumulator:
    """Collects one run's values while its event files are parsed."""

    def __init__(self):
        self.scalars = {}  # tag -> (array of steps, array of values)
        self.json_docs = {tag: [] for tag in _GRADWATCH_JSON_TAGS}  # tag -> [(step, doc)]

    def add_scalar(self, tag, step, value):
        columns = self.scalars.get(tag)
        if columns is None:
            # Layer norms are float32 in the files; keep them compact.
            typecode = "d" if tags.layer_of_tag(tag) is None else "f"
            columns = self.scalars[tag] = (array.array("q"), array.array(typecode))
        columns[0].append(step)
        columns[1].append(value)

    @property
    def has_gradwatch_data(self):
        return tags.GLOBAL in self.scalars or any(self.json_docs.values())


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
        return struct.unpack_from(_CONTENT_FORMATS[tensor.dtype], tensor.tensor_content)[0]
    return None


_CONTENT_FORMATS = {1: "<f", 2: "<d"}  # DT_FLOAT, DT_DOUBLE


def _parse_json(path, tag, step, value):
    strings = value.tensor.string_val
    if not strings:
        raise LogReadError(path, f"tag {tag!r} at step {step} holds no JSON string")
    try:
        return json.loads(strings[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise LogReadError(path, f"malformed JSON in tag {tag!r} at step {step} ({error})")


def _read_file(path, accumulator):
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2

    parse = event_pb2.Event.FromString
    for offset, payload in iter_records(path):
        try:
            event = parse(payload)
        except DecodeError:
            raise LogReadError(path, f"corrupt event record at byte {offset}")
        step = event.step
        for value in event.summary.value:
            tag = value.tag
            if tag in accumulator.json_docs:
                accumulator.json_docs[tag].append((step, _parse_json(path, tag, step, value)))
            elif tag.startswith(tags.PREFIX):
                number = _scalar_of(value)
                if number is not None:
                    accumulator.add_scalar(tag, step, number)


def _series(steps, values):
    """A `Series` sorted by step, keeping the last-written value of each step."""
    steps = np.frombuffer(steps, dtype=np.int64) if len(steps) else np.zeros(0, np.int64)
    dtype = np.float32 if values.typecode == "f" else np.float64
    values = np.frombuffer(values, dtype=dtype) if len(values) else np.zeros(0, dtype)
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


def _explosion(event_step, doc):
    layers = tuple((str(name), to_float(norm)) for name, norm in doc.get("layers") or ())
    epoch = doc.get("epoch")
    return Explosion(
        step=int(doc.get("step", event_step)),
        global_norm=to_float(doc.get("global_norm", math.nan)),
        threshold=to_float(doc.get("threshold")),
        epoch=None if epoch is None else int(epoch),
        layers=layers,
        action=doc.get("action"),
    )


def _clipping_event(event_step, doc):
    threshold = doc.get("threshold")
    return ClippingEvent(
        step=int(doc.get("step", event_step)),
        mode=doc.get("mode"),
        threshold=to_float(threshold) if threshold is not None else None,
    )


def _records(path, tag, docs, make):
    try:
        return _last_per_step(make(step, doc) for step, batch in docs for doc in batch)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise LogReadError(path, f"unexpected record format in tag {tag!r} ({error!r})")


def _layer_order(accumulator, layer_tags):
    """Layer paths: the `gradwatch/layers` order first, then as first seen."""
    written = accumulator.json_docs[tags.LAYERS]
    listed = [str(name) for name in written[-1][1]] if written else []
    seen = [tags.layer_of_tag(tag) for tag in layer_tags]
    return [name for name in listed if name in seen] + [n for n in seen if n not in listed]


def read_run(name, event_files):
    """`RunData` of one run folder's event files, or None without gradwatch data."""
    accumulator = _Accumulator()
    for path in event_files:
        try:
            _read_file(path, accumulator)
        except OSError as error:
            raise LogReadError(path, error.strerror or str(error))
    if not accumulator.has_gradwatch_data:
        return None
    series = {tag: _series(*columns) for tag, columns in accumulator.scalars.items()}
    empty = Series(np.zeros(0, np.int64), np.zeros(0, np.float64))
    layer_tags = [tag for tag in series if tags.layer_of_tag(tag) is not None]
    where = os.path.dirname(event_files[0])
    docs = accumulator.json_docs
    return RunData(
        name=name,
        path=where,
        global_norm=series.pop(tags.GLOBAL, empty),
        layer_norms={layer: series.pop(tags.layer_tag(layer))
                     for layer in _layer_order(accumulator, layer_tags)},
        explosions=_records(where, tags.EXPLOSIONS, docs[tags.EXPLOSIONS], _explosion),
        clipping=_records(where, tags.CLIPPING, docs[tags.CLIPPING], _clipping_event),
        other_series=series,
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

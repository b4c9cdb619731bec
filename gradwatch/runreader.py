"""Collecting one run's values from its event files, in write order.

Plain scalar events go through the numpy fast path of `gradwatch.eventfile`;
any other event is parsed with TensorBoard's protos (imported on first use,
never TensorFlow). A payload that no longer parses as an `Event` is reported as
corrupt (`LogReadError`). A damaged last record of a file (cut short by a live
or interrupted write, a bad checksum, zeros appended) is skipped with a note,
and so is a JSON record refused as too large or too deep (`gradwatch.rundata.parse_json_record`): one note per
file or tag, in `notes`.
"""

import array
import struct

import numpy as np

from gradwatch import tags
from gradwatch.eventfile import LogReadError, iter_records, layout_of, summary_of
from gradwatch.rundata import RefusedRecord, parse_json_record

_JSON_TAGS = (tags.LAYERS, tags.EXPLOSIONS, tags.CLIPPING, tags.VANISHING)
_PLUGIN_TAG_PREFIX = tags.PLUGIN_NAME + "/"  # gradwatch/layers, gradwatch/alerts, ...


class RunReader:
    """Collects one run's values while its event files are parsed in order."""

    _MAX_LAYOUTS = 64

    def __init__(self):
        self.parts = {}  # tag -> [(steps, values)] in write order
        self.json_docs = {tag: [] for tag in _JSON_TAGS}  # tag -> [(step, doc)]
        self.layouts = {}  # summary length -> [Layout]
        self.columns = {}  # tag -> (steps, values) of slowly parsed events
        self.other_plugin_data = False  # e.g. gradwatch/alerts text
        self._refused = {}  # tag -> [count, first reason]
        self._tails = []  # notes on truncated last records

    @property
    def notes(self):
        """One line per file with a truncated tail and per tag with refused records."""
        refused = [
            f"{count} JSON record(s) of tag {tag!r} refused ({reason})" if count > 1
            else f"a JSON record of tag {tag!r} refused ({reason})"
            for tag, (count, reason) in self._refused.items()]
        return tuple(self._tails + refused)

    def read_file(self, path):
        """Adds the values of the event file at `path`, after those read before."""
        from google.protobuf.message import DecodeError
        from tensorboard.compat.proto import event_pb2

        def damaged(offset, reason):
            self._tails.append(f"{path}: {reason} skipped; the records before it are read")

        for offset, payload in iter_records(path, on_damaged_tail=damaged):
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
            found = summary_of(payload)
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
                try:
                    self.json_docs[tag].append((step, _parse_json(path, tag, step, value)))
                except RefusedRecord as refused:
                    entry = self._refused.setdefault(tag, [0, f"step {step}: {refused}"])
                    entry[0] += 1
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
            step, summary = summary_of(payload)
            layout = layout_of(summary)
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
    """The JSON document held by a `Summary.Value` written at `step`."""
    strings = value.tensor.string_val
    if not strings:
        raise LogReadError(path, f"tag {tag!r} at step {step} holds no JSON string")
    try:
        return parse_json_record(strings[0])
    except RefusedRecord:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise LogReadError(path, f"malformed JSON in tag {tag!r} at step {step} ({error})")

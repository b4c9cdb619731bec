"""Writing gradwatch data to TensorBoard event files.

The only module that writes files. Per-step scalars are encoded straight to
protobuf wire format (one `Event` per step holding every tag of that step) and
written with TensorFlow's C++ record writer: writing 200 layers for one step
costs tens of microseconds, where one eager `tf.summary.scalar` call per value
would cost milliseconds. Tests parse the output with TensorBoard's own protos.
"""

import itertools
import json
import math
import os
import socket
import struct
import time

from gradwatch import tags

_DATA_CLASS_SCALAR = 1
_DATA_CLASS_TENSOR = 2


def _varint(value):
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number, wire_type):
    return _varint((number << 3) | wire_type)


def _length_delimited(number, payload):
    return _field(number, 2) + _varint(len(payload)) + payload


def _metadata(plugin_name, data_class):
    plugin_data = _length_delimited(1, plugin_name.encode())  # PluginData.plugin_name
    return _length_delimited(1, plugin_data) + _field(4, 0) + _varint(data_class)


_SCALAR_METADATA = _metadata("scalars", _DATA_CLASS_SCALAR)
_BLOCK_METADATA = _metadata(tags.PLUGIN_NAME, _DATA_CLASS_TENSOR)
_FLOAT = struct.Struct("<f")


def encode_scalar_value(tag, value, with_metadata):
    """`Summary.Value` bytes of a float32 scalar: `simple_value` (5 bytes, where a
    rank-0 tensor takes 12), with the scalars plugin's metadata if asked. Both
    TensorBoard loaders read it as a scalar of the Scalars tab."""
    body = _length_delimited(1, tag.encode())
    if with_metadata:
        body += _length_delimited(9, _SCALAR_METADATA)
    return body + _field(2, 5) + _FLOAT.pack(value)


def encode_block_value(tag, matrix, with_metadata):
    """`Summary.Value` bytes of a float32 matrix (rows x columns) owned by the gradwatch plugin."""
    rows, columns = matrix.shape
    shape = (_length_delimited(2, _field(1, 0) + _varint(rows))
             + _length_delimited(2, _field(1, 0) + _varint(columns)))
    content = matrix.astype("<f4", copy=False).tobytes()
    tensor = _field(1, 0) + _varint(1) + _length_delimited(2, shape) + _length_delimited(4, content)
    body = _length_delimited(1, tag.encode())
    if with_metadata:
        body += _length_delimited(9, _BLOCK_METADATA)
    return body + _length_delimited(8, tensor)


def encode_event(step, wall_time, summary_values=b"", file_version=None):
    """`Event` bytes: wall_time, step, and a summary of encoded values."""
    event = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        event += _length_delimited(3, file_version.encode())
    if summary_values:
        event += _length_delimited(5, summary_values)
    return event


def _string_tensor_value(tag, text, plugin_name):
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = plugin_name
    metadata.data_class = summary_pb2.DATA_CLASS_TENSOR
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        string_val=[text.encode()],
    )
    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
    return _length_delimited(1, value.SerializeToString())


def json_safe(value):
    """A float for JSON: non-finite values become the strings "nan", "inf", "-inf"."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


_files_opened = itertools.count()


def event_file_name():
    """Unique per process and call, ordered by time like TensorFlow's names."""
    return "events.out.tfevents.%010d.%s.%d.%d.gradwatch.v2" % (
        int(time.time()), socket.gethostname(), os.getpid(), next(_files_opened))


class EventWriter:
    """Appends gradwatch events to one new event file in `run_dir`.

    Raises `OSError` (or TensorFlow's equivalent) on I/O failure; the caller
    decides whether that is fatal.
    """

    def __init__(self, run_dir):
        import tensorflow as tf

        tf.io.gfile.makedirs(run_dir)
        self.path = os.path.join(run_dir, event_file_name())
        self._records = tf.io.TFRecordWriter(self.path)
        self._value_prefixes = {}  # tag -> `Summary.value` bytes up to the float
        self._records.write(encode_event(0, time.time(), file_version="brain.Event:2"))
        self._records.flush()

    def write_scalars(self, step, values_by_tag, wall_time=None):
        """Writes one event at `step` holding a float32 scalar per tag.

        A tag's first value carries its metadata; later ones reuse the tag's
        encoded prefix (every length is constant: the float is 4 bytes)."""
        encoded = []
        prefixes = self._value_prefixes
        for tag, value in values_by_tag.items():
            prefix = prefixes.get(tag)
            if prefix is None:
                encoded.append(_length_delimited(1, encode_scalar_value(tag, value, True)))
                prefixes[tag] = _length_delimited(1, encode_scalar_value(tag, 0.0, False))[:-4]
            else:
                encoded.append(prefix + _FLOAT.pack(value))
        self._write(step, b"".join(encoded), wall_time)

    def write_block(self, first_step, matrix):
        """Writes `gradwatch/norms`: float32 rows of consecutive steps from `first_step`
        (column 0 the global norm, then the layers in `gradwatch/layers` order)."""
        first = tags.NORMS not in self._value_prefixes
        self._value_prefixes.setdefault(tags.NORMS, b"")
        self._write(first_step, _length_delimited(1, encode_block_value(tags.NORMS, matrix, first)), None)

    def write_json(self, step, tag, obj):
        """A JSON document as a string tensor owned by the gradwatch plugin."""
        text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
        self._write(step, _string_tensor_value(tag, text, tags.PLUGIN_NAME), None)

    def write_text(self, step, tag, markdown):
        """A markdown line for TensorBoard's Text tab."""
        self._write(step, _string_tensor_value(tag, markdown, "text"), None)

    def _write(self, step, summary_bytes, wall_time):
        when = time.time() if wall_time is None else wall_time
        self._records.write(encode_event(int(step), when, summary_bytes))

    def flush(self):
        self._records.flush()

    def close(self):
        self._records.close()

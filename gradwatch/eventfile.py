"""Low-level reading of TensorBoard event files, without TensorFlow.

A small pure-Python TFRecord reader: record framing is checked (lengths and
their CRC32C). A file whose last record is damaged (cut short, a bad length
checksum with nothing valid after it, zeros appended, a bad data checksum) is
read up to the damage, as TensorBoard reads it, and the damage is reported to
the caller; damage before the end of a file, or a file that is not an event
file, raises `LogReadError`. Payload checksums are verified for the last
record of a file only (pure-Python CRC32C would dominate the read time).

The wire-level fast path below reads the float32 scalars of plain `Event`s
with numpy, without parsing each event with protobuf. `gradwatch.logs` builds
runs from these pieces.
"""

import array
import os
import struct

import numpy as np

from gradwatch import tags

EVENT_FILE_PREFIX = "events.out.tfevents."


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


class TruncatedTail(Exception):
    """The file ends inside its last record (a live or interrupted write)."""


class DamagedTail(Exception):
    """The last record of the file is damaged: no whole, valid record follows the damage."""


def iter_records(path, on_damaged_tail=None):
    """Yields `(byte offset, payload)` of each TFRecord in the file at `path`.

    A damaged last record ends the iteration: a record cut short by the end
    of the file (a write in progress, or one interrupted by a full disk or a
    crash), a bad length checksum with no valid record after it (a torn
    write; zeros appended after a power loss), or a bad data checksum of the
    record that ends the file. With `on_damaged_tail`, it is called with the
    record's byte offset and a reason (`"record cut short at byte N (...)"`,
    `"damaged record at byte N (...)"`); without, `LogReadError` is raised.
    Damage before the end of the file (a bad length checksum followed by a
    valid record), or a first record that is neither valid nor zeros (not an
    event file), is always a `LogReadError` naming the file and the byte
    offset. Data checksums are verified for the last record only (pure-Python
    CRC32C, ~0.2 s per MB).
    """
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        offset = 0
        try:
            while header := stream.read(_HEADER.size):
                if len(header) < _HEADER.size:
                    raise TruncatedTail(f"record cut short at byte {offset} (a write in progress or interrupted)")
                length, length_crc = _HEADER.unpack(header)
                if masked_crc32c(header[:8]) != length_crc:
                    zeros = _zeros_to_end(stream, offset)
                    if (offset == 0 and not zeros) or (not zeros and _valid_record_after(stream, offset + 1)):
                        raise LogReadError(
                            path, f"corrupt record at byte {offset} (bad length checksum; "
                            "is it a TensorBoard event file?)")
                    what = "zeros to the end of the file" if zeros else "bad length checksum, no record after it"
                    raise DamagedTail(f"damaged record at byte {offset} ({what})")
                if length + 4 > size - stream.tell():  # never allocate more than the file holds
                    size = os.fstat(stream.fileno()).st_size  # it may be growing
                    if length + 4 > size - stream.tell():
                        raise TruncatedTail(f"record cut short at byte {offset} (a write in progress or interrupted)")
                payload = stream.read(length + 4)  # data, then its masked CRC32C
                if len(payload) < length + 4:
                    raise TruncatedTail(f"record cut short at byte {offset} (a write in progress or interrupted)")
                if stream.tell() >= size and not _data_checksum_ok(payload):
                    raise DamagedTail(f"damaged record at byte {offset} (bad data checksum)")
                yield offset, payload[:length]
                offset += _HEADER.size + length + 4
        except (TruncatedTail, DamagedTail) as tail:
            if on_damaged_tail is None:
                raise LogReadError(path, str(tail))
            on_damaged_tail(offset, str(tail))


def _data_checksum_ok(payload):
    """`payload` is a record's data followed by its masked CRC32C."""
    return masked_crc32c(payload[:-4]) == struct.unpack("<I", payload[-4:])[0]


_SCAN_CHUNK = 1 << 20


def _zeros_to_end(stream, start):
    stream.seek(start)
    while chunk := stream.read(_SCAN_CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _valid_record_after(stream, start):
    """Whether a whole record with valid checksums starts at or after byte `start`.

    The headers are screened with numpy (a length that fits in the file), so
    only a few positions are checked in Python; a run of zeros is never a header.
    """
    size = os.fstat(stream.fileno()).st_size
    position = start
    zero_header_crc = masked_crc32c(bytes(8))
    while position + _HEADER.size + 4 <= size:
        stream.seek(position)
        chunk = stream.read(_SCAN_CHUNK + _HEADER.size)
        if len(chunk) < _HEADER.size:
            return False
        buf = np.frombuffer(chunk, np.uint8)
        count = len(chunk) - _HEADER.size + 1
        windows = np.lib.stride_tricks.sliding_window_view(buf, 8)[:count]
        low = windows[:, :4].astype(np.uint64) @ (np.uint64(1) << np.arange(0, 32, 8, dtype=np.uint64))
        high_zero = ~windows[:, 4:].any(axis=1)
        room = size - (position + np.arange(count, dtype=np.int64)) - _HEADER.size - 4
        for index in np.flatnonzero(high_zero & (low.astype(np.int64) <= room)):
            header = chunk[index:index + _HEADER.size]
            length, length_crc = _HEADER.unpack(header)
            if length_crc == 0 and length == 0 and zero_header_crc != 0:
                continue
            if masked_crc32c(header[:8]) != length_crc:
                continue
            stream.seek(position + int(index) + _HEADER.size)
            payload = stream.read(length + 4)
            if len(payload) == length + 4 and _data_checksum_ok(payload):
                return True
        position += count
    return False


# -- wire-level fast path -----------------------------------------------------
# Parsing every `Summary.Value` into Python costs microseconds per number; a
# 100k-step x 200-layer run holds 20M of them. Events whose summaries have the
# same bytes once their float32 numbers are masked out share a `Layout`: their
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


def summary_of(payload):
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


class Layout:
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


def layout_of(summary):
    """A `Layout` for `summary` if all its values are float32 scalars, else None."""
    offsets, kept_tags, kept_offsets = [], [], []
    for number, wire, lo, hi in _fields(summary, 0, len(summary)):
        tag, offset = _value_number_at(summary, lo, hi) if number == 1 else (None, None)
        if tag is None or offset is None:
            return None
        offsets.append(offset)
        if tag.startswith(tags.PREFIX):
            kept_tags.append(tag)
            kept_offsets.append(offset)
    return Layout(summary, offsets, kept_tags, kept_offsets) if offsets else None

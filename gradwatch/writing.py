"""The events of a drained batch, and writing them without stopping training.

An event is `(step or None, write(writer))`, written by calling `write` with
an `EventWriter`. A scalar event carries its step, so the steps that could not
be written are counted.

`ReopeningWriter` never raises: a failure is logged once as a warning on the
`"gradwatch"` logger and the run goes on. A failed write closes the event file;
the events not yet written go to a new event file in the same run folder
(recreated if it was removed), at once if possible, else at the next write:
steps are lost only while the folder cannot be written. An event file deleted
under the writer is noticed at the next write.
"""

import logging
import math
import os
import time

import numpy as np

from gradwatch import state, summaries, tags

logger = logging.getLogger("gradwatch")

# Events are queued in memory and written and flushed together at most this
# often, or when a drain asks (epoch ends, the end of training), or when
# `_MAX_QUEUED` are waiting: encoding a batch at once costs a fraction of
# encoding each step's event after its step (cold caches).
FLUSH_SECONDS = 2.0
_MAX_QUEUED = 1024
# New event files one `write` may open after failures (bounds file creation
# while a disk stays full).
_OPENS_PER_CALL = 4


# -- building events -------------------------------------------------------------


def batch_events(steps, rows, layer_tags, clip_mode, explosions, switches, lines):
    """`[(step or None, write(writer))]` of one drained batch, in order.

    `switches` are the clipping events of the batch, `lines` its alert text."""
    events, overflows, normal = [], 0, []
    for index, (step, row) in enumerate(zip(steps, rows)):
        if int(row[state.FLAGS]) & state.OVERFLOW:
            overflows += 1  # the loss-scale optimizer skipped it: no norms
            continue
        normal.append(index)
        values = row_values(row, layer_tags, clip_mode)
        if overflows:
            values[tags.OVERFLOW], overflows = float(overflows), 0
        events.append(scalars_event(int(step), values))
    if overflows:  # skipped steps not yet followed by an update
        events.append(scalars_event(int(steps[-1]), {tags.OVERFLOW: float(overflows)}))
    events += block_events(np.asarray(steps)[normal], np.asarray(rows)[normal])
    return events + alert_events(int(steps[-1]), explosions, switches, lines)


def alert_events(last, explosions, switches, lines):
    """The events of a batch's explosions, clipping switches and alert text, at step `last`."""
    events = []
    if explosions:
        docs = [e.to_json() for e in explosions]
        events.append((None, lambda writer: writer.write_json(last, tags.EXPLOSIONS, docs)))
    if switches:
        events.append((None, lambda writer: writer.write_json(last, tags.CLIPPING, switches)))
    return events + text_events(lines, last)


def vanishing_events(records, lines):
    """The events writing vanishing / dead-gradient `records` and their alert
    `lines`, at the last record's step (none without records)."""
    if not records:
        return []
    last, docs = records[-1].step, [record.to_json() for record in records]
    return [(None, lambda writer: writer.write_json(last, tags.VANISHING, docs))] + text_events(lines, last)


def block_events(steps, rows):
    """`gradwatch/norms` events of norm rows: one block per run of consecutive steps."""
    if not len(steps):
        return []
    steps = np.asarray(steps, np.int64)
    matrix = np.concatenate(
        [rows[:, state.GLOBAL:state.GLOBAL + 1], rows[:, state.LAYERS_START:]], axis=1).astype(np.float32)
    breaks = np.flatnonzero(np.diff(steps) != 1) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, steps.size]
    return [(None, lambda writer, s=s, e=e: writer.write_block(int(steps[s]), matrix[s:e]))
            for s, e in zip(starts, ends)]


def text_events(lines, step):
    """The event writing alert `lines` to TensorBoard's Text tab at `step`, if any."""
    if not lines:
        return []
    text = "\n\n".join(lines)
    return [(None, lambda writer: writer.write_text(step, tags.ALERTS_TEXT, text))]


def scalars_event(step, values):
    return step, lambda writer: writer.write_scalars(step, values)


def row_values(row, layer_tags, clip_mode):
    """Tag -> value of one device record (`gradwatch.state` row layout)."""
    flags = int(row[state.FLAGS])
    values = {tags.GLOBAL: float(row[state.GLOBAL])}
    values.update(zip(layer_tags, row[state.LAYERS_START:].tolist()))
    if math.isfinite(row[state.THRESHOLD]):
        values[tags.THRESHOLD] = float(row[state.THRESHOLD])
    if clip_mode is not None:
        values[tags.GLOBAL_CLIPPED] = float(row[state.GLOBAL_CLIPPED])
        if flags & state.CLIP_ACTIVE:
            values[tags.CLIP_THRESHOLD] = float(row[state.CLIP_THRESHOLD])
    if flags & state.EXPLODED:
        values[tags.EXPLOSION] = 1.0
    return values


# -- writing them ----------------------------------------------------------------


class ReopeningWriter:
    """Writes events to `writer`'s run folder, in a new event file after a failure.

    `on_new_file(writer)` writes the first events of each new event file (not
    of `writer`'s); its failure counts as a write failure.
    """

    def __init__(self, writer, on_new_file):
        self.writer = writer  # None after a failure, until a new file opens
        self.run_dir = os.path.dirname(writer.path)
        self.on_new_file = on_new_file
        self.missing_steps = 0  # steps that could not be written
        self._warned = False
        self._flushed_at = time.monotonic()
        self._queued = []

    def due(self, waiting=0):
        """A write is due: the last flush is `FLUSH_SECONDS` old, or `_MAX_QUEUED`
        events (queued here, plus `waiting` the caller holds) are waiting."""
        return (len(self._queued) + waiting >= _MAX_QUEUED
                or time.monotonic() - self._flushed_at >= FLUSH_SECONDS)

    def _flush(self, writer):
        writer.flush()
        self._flushed_at = time.monotonic()

    def write(self, events, flush=True):
        """Queues `events`; writes all queued events in order and flushes if
        `flush`, if the last flush is `FLUSH_SECONDS` old or if `_MAX_QUEUED`
        are waiting; never raises.

        An event whose write fails closes the event file and is retried once
        in a new one; if that fails too it is dropped (counted if it holds a
        step's norms) and the next events go on. At most `_OPENS_PER_CALL`
        new files are opened per call; past that the rest is dropped."""
        self._queued.extend(events)
        if not (flush or self.due()):
            return
        events, self._queued = self._queued + [(None, self._flush)], []
        self._drop_deleted_file()
        opens = 0
        for index, (step, write) in enumerate(events):
            for attempt in range(2):
                had_writer = self.writer is not None
                writer = self._usable_writer()
                opens += not had_writer
                if writer is None or opens > _OPENS_PER_CALL:
                    self.missing_steps += sum(1 for s, _ in events[index:] if s is not None)
                    return
                try:
                    write(writer)
                    break
                except Exception as error:
                    self.failed(error)
            else:
                self.missing_steps += step is not None

    def close(self):
        """Writes the queued events and closes the event file; never raises."""
        if self._queued:
            self.write([], flush=True)
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as error:
                self.failed(error)
        if self.missing_steps:
            logger.info("gradwatch: %d steps could not be written to %s.",
                        self.missing_steps, self.run_dir)

    def failed(self, error):
        """Logs a write failure (once) and closes the event file."""
        if not self._warned:
            self._warned = True
            logger.warning(f"gradwatch could not write its logs to {self.run_dir!r} "
                           f"({type(error).__name__}: {error}); training goes on, and "
                           "gradwatch writes to a new event file as soon as it can.")
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def _drop_deleted_file(self):
        """Closes the writer if its event file was deleted (a new one opens)."""
        if self.writer is not None and not _exists(self.writer.path):
            self.failed(FileNotFoundError(f"the event file {self.writer.path} was deleted"))

    def _usable_writer(self):
        """The open writer; a new one if it failed; None if none opens."""
        if self.writer is None:
            try:
                self.writer = summaries.EventWriter(self.run_dir)
            except Exception:
                return None
            logger.info("gradwatch writes its logs again, to %s (%d steps could not be written "
                        "so far).", self.writer.path, self.missing_steps)
            try:
                self.on_new_file(self.writer)
            except Exception as error:
                self.failed(error)
        return self.writer


def _exists(path):
    try:
        if "://" in path:
            import tensorflow as tf

            return tf.io.gfile.exists(path)
        return os.path.exists(path)
    except Exception:
        return True  # unknown: keep writing, a failing write is noticed anyway

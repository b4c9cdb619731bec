"""Host side of one monitored `fit()`: drains the device records, logs alerts,
switches the optimizer's reported clipping on, and writes the summaries.

Nothing here may stop training: a failure is logged once (per kind: write,
drain, alerts, ...) as a warning on the `"gradwatch"` logger and the run goes
on. A failed write closes the event file; the events not yet written go to a
new event file in the same run folder (recreated if it was removed), at once if
possible, else at the next drain: steps are lost only while the folder cannot
be written. An event file deleted under the writer is noticed at the next drain.

A recorder left open by a `fit()` that ended without `on_train_end` (e.g. a
`KeyboardInterrupt`) is finished -- drained, flushed, closed, its hook removed
-- when a `GradientMonitor` next starts training on that optimizer, or at
interpreter exit.
"""

import atexit
import logging
import math
import os
import weakref

import numpy as np

from gradwatch import alerts, clipping, state, summaries, tags

logger = logging.getLogger("gradwatch")


_NO_GRADIENT = (
    "GradientMonitor saw no gradient: the optimizer was never called. A custom `train_step` "
    "must apply gradients with `self.optimizer.apply(...)` or `apply_gradients(...)`, and the "
    "model needs trainable weights.")


_open_recorders = weakref.WeakSet()  # finished at interpreter exit


@atexit.register
def _finish_open_recorders():
    for recorder in list(_open_recorders):
        try:
            recorder.finish(recorder.last_epoch)
        except BaseException:  # noqa: BLE001 -- never fail the interpreter's exit
            pass


class Recorder:
    def __init__(self, monitor, capture, writer, print_fn):
        self.monitor = monitor
        self.capture = capture
        self.writer = writer
        self.run_dir = os.path.dirname(writer.path)
        self.print_fn = print_fn
        self.closed = False
        self.last_epoch = 0
        self._layer_tags = None
        self._records_read = 0
        self._alert_log = alerts.AlertLog(print_fn)
        self._warned = set()
        self._missing_steps = 0  # steps that could not be written
        self._layers_step = None  # step of the last `gradwatch/layers` written
        capture.recorder = self

    # -- lifecycle -----------------------------------------------------------
    @property
    def layer_paths(self):
        return self.capture.layer_paths or []

    def start(self):
        model = self.capture.model
        if model.built and not model.trainable_variables:
            raise ValueError("GradientMonitor found no trainable weights in the model: "
                             "there is no gradient to monitor.")
        self._take_over_stale_capture()
        self.capture.install()
        if self.capture.ready:
            self._check_layer_names()
        model.make_train_function(force=True)
        _open_recorders.add(self)

    def _take_over_stale_capture(self):
        """Finishes a recorder still hooked on this optimizer: its `fit()` ended
        without `on_train_end` (KeyboardInterrupt, an error), or two monitors
        are in one `fit()` (then only this one records)."""
        stale = getattr(self.capture.optimizer, "_gradwatch_capture", None)
        if stale is None:
            return
        previous = getattr(stale, "recorder", None)
        logger.warning(
            "GradientMonitor: another GradientMonitor was still attached to this optimizer (its "
            "fit() ended without on_train_end, e.g. on KeyboardInterrupt, or two monitors are in "
            "one fit()); its records were written to %s and it was detached.",
            previous.run_dir if previous is not None else "its log folder")
        if previous is not None:
            previous.finish(previous.last_epoch)
        else:
            stale.uninstall()

    def abandon(self):
        """Undoes `start()` after a start-up error (before any training step)."""
        self.closed = True
        _open_recorders.discard(self)
        if getattr(self.capture.optimizer, "_gradwatch_capture", None) is self.capture:
            self.capture.uninstall()
        self.capture.model.train_function = None
        try:
            self.writer.close()
            os.remove(self.writer.path)  # holds only the file header
        except Exception:
            pass

    def _check_layer_names(self):
        clash = [p for p in self.layer_paths if tags.layer_tag(p) in tags.RESERVED]
        if clash:
            raise ValueError(f"Layer names clash with gradwatch's own tags: {clash}. Rename the layers.")

    def _begin_writing(self):
        """First drain after the step was traced: layer tags and order."""
        self._layer_tags = [tags.layer_tag(p) for p in self.layer_paths]
        clash = [t for t in self._layer_tags if t in tags.RESERVED]
        if clash:
            self._warn_once("names", f"layer names clash with gradwatch's own tags: {clash}")
        return [self._layers_event()]

    def _layers_event(self):
        step, paths = int(self.capture.optimizer.iterations.numpy()), list(self.layer_paths)

        def write(writer):
            if step != self._layers_step:  # once per step, however many files are opened
                writer.write_json(step, tags.LAYERS, paths)
                self._layers_step = step
        return None, write

    def finish(self, epoch):
        """Drains, flushes and closes: the end of a monitored `fit()`. Idempotent."""
        if not self.closed:
            self.drain(epoch, flush=True)
            self.close()

    def close(self):
        """Removes the hook and closes the writer; never raises. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _open_recorders.discard(self)
        lines = self._guard("alerts", self._alert_log.close, [])
        if lines:
            self._write_events(self._text_events(lines, None))
        self._guard("detach", self.capture.uninstall)
        self.capture.model.train_function = None  # the next fit() retraces without the hook
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as error:
                self._writer_failed(error)
        if self._missing_steps:
            logger.info("gradwatch: %d steps could not be written to %s.",
                        self._missing_steps, self.run_dir)

    # -- per drain -----------------------------------------------------------
    def drain(self, epoch, flush=False):
        """Reads the new records, logs alerts and writes them; never raises."""
        if self.closed:
            return
        self.last_epoch = epoch
        self._guard("drain", lambda: self._drain(epoch, flush))

    def _drain(self, epoch, flush):
        if not self.capture.ready:
            if self.capture.traced or flush:
                self._warn_once("no_gradient", _NO_GRADIENT)
            return
        events = []
        if self._layer_tags is None:
            events += self._begin_writing()
        steps, rows, total, lost = self.capture.state.read_since(self._records_read)
        self._records_read = total
        if lost:
            self._warn_once("lost", f"{lost} steps were overwritten on the device before being read; "
                                    "use a smaller `update_freq`.")
        if len(steps):
            explosions = alerts.explosions_from_records(
                steps, rows, self.layer_paths, epoch, self.monitor.top_layers)
            self.monitor.explosions.extend(explosions)
            by_step = {e.step: e for e in explosions}
            # Log in step order: the alerts up to the switch, the switch, the rest.
            switched = np.flatnonzero(state.has_flag(rows[:, state.FLAGS], state.CLIP_SWITCHED_ON))
            cut = int(switched[0]) + 1 if len(switched) else len(steps)
            lines = self._guard("alerts", lambda: self._alert_log.feed(steps[:cut], rows[:cut], by_step), [])
            switches = self._guard("clipping", lambda: self._clipping_switches(
                steps, rows, explosions, epoch), [])
            lines += self._guard("alerts", lambda: self._alert_log.feed(steps[cut:], rows[cut:], by_step), [])
            events += self._events(steps, rows, explosions, switches, lines)
        if events or flush:
            self._write_events(events)

    def _clipping_switches(self, steps, rows, explosions, epoch):
        switched = state.has_flag(rows[:, state.FLAGS], state.CLIP_SWITCHED_ON)
        events = []
        for index in np.flatnonzero(switched):
            step, threshold = int(steps[index]), float(rows[index, state.CLIP_THRESHOLD])
            mode = self.capture.policy.clip_mode
            setattr(self.capture.optimizer, mode, threshold)
            event = {"step": step, "epoch": int(epoch), "mode": mode,
                     "threshold": threshold, "cause_step": step}
            events.append(event)
            self.monitor.clipping_events.append(event)
            cause = next((e for e in explosions if e.step == step), None)
            self._log_switch(event, cause)
        return events

    def _log_switch(self, event, cause):
        how = ""
        if self.capture.policy.clip_threshold == "auto":
            how = (f" (the {clipping.AUTO_PERCENTILE:g}th percentile of the last "
                   f"{clipping.AUTO_HISTORY} healthy global norms)")
        text = (f"switched on {event['mode']}={event['threshold']:.4g}{how} at step "
                f"{event['step']} (that step included)")
        if cause is not None:
            text += (f", after the gradient explosion at step {cause.step} "
                     f"(global norm {cause.global_norm:.3g})")
        logger.warning(text, extra={"gradwatch_clipping": event})
        if self.print_fn is not None:
            self.print_fn("gradwatch: " + text)

    # -- writing ---------------------------------------------------------------
    def _events(self, steps, rows, explosions, switches, lines):
        """`[(step or None, write(writer))]` of one drained batch, in order.

        A scalar event carries its step, so the steps that could not be
        written are counted."""
        clip_mode = self.capture.policy.clip_mode
        events, overflows = [], 0
        for step, row in zip(steps, rows):
            if int(row[state.FLAGS]) & state.OVERFLOW:
                overflows += 1  # the loss-scale optimizer skipped it: no norms
                continue
            values = self._row_values(row, clip_mode)
            if overflows:
                values[tags.OVERFLOW], overflows = float(overflows), 0
            events.append(_scalars_event(int(step), values))
        if overflows:  # skipped steps not yet followed by an update
            events.append(_scalars_event(int(steps[-1]), {tags.OVERFLOW: float(overflows)}))
        last = int(steps[-1])
        if explosions:
            docs = [e.to_json() for e in explosions]
            events.append((None, lambda writer: writer.write_json(last, tags.EXPLOSIONS, docs)))
        if switches:
            events.append((None, lambda writer: writer.write_json(last, tags.CLIPPING, switches)))
        return events + self._text_events(lines, last)

    def _text_events(self, lines, step):
        if not lines:
            return []
        step = step if step is not None else int(self.capture.optimizer.iterations.numpy())
        text = "\n\n".join(lines)
        return [(None, lambda writer: writer.write_text(step, tags.ALERTS_TEXT, text))]

    def _write_events(self, events):
        """Writes `events` in order, then flushes; never raises.

        On a failure the event file is closed and the rest goes to a new event
        file (once per call); what still cannot be written is dropped, and
        counted if it holds a step's norms."""
        index, retried = 0, False
        events = list(events) + [(None, lambda writer: writer.flush())]
        while index < len(events):
            writer = self._usable_writer()
            if writer is None:
                break
            try:
                while index < len(events):
                    events[index][1](writer)
                    index += 1
            except Exception as error:
                self._writer_failed(error)
                if retried:
                    break
                retried = True
        self._missing_steps += sum(1 for step, _ in events[index:] if step is not None)

    def _usable_writer(self):
        """The open writer; a new one if it failed or its file was deleted; None if none opens."""
        if self.writer is not None and not _exists(self.writer.path):
            self._writer_failed(FileNotFoundError(f"the event file {self.writer.path} was deleted"))
        if self.writer is None:
            try:
                self.writer = summaries.EventWriter(self.run_dir)
            except Exception:
                return None
            logger.info("gradwatch writes its logs again, to %s (%d steps could not be written "
                        "so far).", self.writer.path, self._missing_steps)
            if self._layer_tags is not None:  # each event file names its layers
                try:
                    self._layers_event()[1](self.writer)
                except Exception as error:
                    self._writer_failed(error)
        return self.writer

    def _writer_failed(self, error):
        self._warn_once("write", f"gradwatch could not write its logs to {self.run_dir!r} "
                                 f"({type(error).__name__}: {error}); training goes on, and "
                                 "gradwatch writes to a new event file as soon as it can.")
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def _row_values(self, row, clip_mode):
        flags = int(row[state.FLAGS])
        values = {tags.GLOBAL: float(row[state.GLOBAL])}
        values.update(zip(self._layer_tags, row[state.LAYERS_START:].tolist()))
        if math.isfinite(row[state.THRESHOLD]):
            values[tags.THRESHOLD] = float(row[state.THRESHOLD])
        if clip_mode is not None:
            values[tags.GLOBAL_CLIPPED] = float(row[state.GLOBAL_CLIPPED])
            if flags & state.CLIP_ACTIVE:
                values[tags.CLIP_THRESHOLD] = float(row[state.CLIP_THRESHOLD])
        if flags & state.EXPLODED:
            values[tags.EXPLOSION] = 1.0
        return values

    # -- failure isolation -------------------------------------------------------
    def _guard(self, what, action, default=None):
        """`action()`, or `default` after logging its failure once."""
        try:
            return action()
        except Exception as error:  # monitoring must never stop training
            self._warn_once(what, f"gradwatch could not {what} ({type(error).__name__}: {error}); "
                                  "training goes on.")
            return default

    def _warn_once(self, key, text):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(text)


def _scalars_event(step, values):
    return step, lambda writer: writer.write_scalars(step, values)


def _exists(path):
    try:
        if "://" in path:
            import tensorflow as tf

            return tf.io.gfile.exists(path)
        return os.path.exists(path)
    except Exception:
        return True  # unknown: keep writing, a failing write is noticed anyway

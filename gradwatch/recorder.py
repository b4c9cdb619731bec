"""Host side of one monitored `fit()`: drains the device records, logs alerts,
switches the optimizer's reported clipping on, and writes the summaries.

Nothing here may stop training: a failure is logged once (per kind: write,
drain, alerts, ...) as a warning on the `"gradwatch"` logger and the run goes
on. Events are built and written by `gradwatch.writing`: a failed write goes on
in a new event file in the same run folder, at once or at the next drain.

A recorder left open by a `fit()` that ended without `on_train_end` (e.g. a
`KeyboardInterrupt`) is finished -- drained, flushed, closed, its hook removed
-- when a `GradientMonitor` next starts training on that optimizer, or at
interpreter exit.
"""

import atexit
import logging
import os
import weakref

import numpy as np

from gradwatch import alerts, state, tags, vanishing_watch, writing

logger = logging.getLogger("gradwatch")


NO_GRADIENT = (
    "GradientMonitor saw no gradient: the optimizer was never called. A custom `train_step` "
    "must apply gradients with `self.optimizer.apply(...)` or `apply_gradients(...)`, and the "
    "model needs trainable weights.")

_NEVER_APPLIED = (
    "GradientMonitor: the optimizer {name!r} given in `optimizers` never applied gradients "
    "in the monitored steps: nothing was recorded for it.")

_TRACED_BEFORE = (
    "GradientMonitor: the optimizer {name!r} applied gradients (its step count went from {start} "
    "to {now}) in a step function traced before gradwatch was attached, so gradwatch cannot see "
    "them. Call `on_train_begin()` (e.g. `keras.callbacks.CallbackList([monitor], model=model)`) "
    "before the first call of your `tf.function`, or create the function after it.")


_open_recorders = weakref.WeakSet()  # finished at interpreter exit


@atexit.register
def _finish_open_recorders():
    for recorder in list(_open_recorders):
        try:
            recorder.finish(recorder.last_epoch)
        except BaseException:  # noqa: BLE001 -- never fail the interpreter's exit
            pass


class Recorder:
    """Records one optimizer's steps (`capture`) into one run (`writer`).

    `report_unused`: warn at the end when the optimizer never applied gradients
    (an optimizer the user named); else a recorder whose optimizer was not used
    leaves nothing behind.
    """

    def __init__(self, monitor, capture, writer, print_fn, report_unused=True, name=None):
        self.monitor = monitor
        self.name = name or capture.name or "optimizer"  # in warnings
        self.capture = capture
        self.report_unused = report_unused
        self._output = writing.ReopeningWriter(writer, on_new_file=self._name_layers)
        self.closed = False
        self.last_epoch = 0
        self._layer_tags = None
        self._records_read = 0
        self._alert_log = alerts.AlertLog(print_fn, label=capture.name)
        self._start_iterations = None
        self._vanishing = monitor.vanishing_config and vanishing_watch.VanishingWatch(
            monitor.vanishing_config, capture, self._alert_log, monitor.vanishing)
        self._warned = set()
        self._layers_step = None  # step of the last `gradwatch/layers` written
        self._pending, self._pending_rows = [], 0  # drained rows whose events are not built yet
        # "auto" judges the first healthy steps again once the detector's window is full
        # (`AutoThreshold.rejudge_ratio`): their (step, global norm), to name the one that did it.
        policy = capture.policy
        self._first_norms = [] if policy.restarts and policy.auto.rejudges_start else None
        self._book = None
        if getattr(capture, "keeper", None) is not None:
            from gradwatch.culprits.book import CulpritBook

            writes = monitor.culprits is True
            self._book = CulpritBook(capture.model, self._store_batch if writes else None,
                                     self._remove_batch if writes else None)
        capture.recorder = self

    # -- lifecycle -----------------------------------------------------------
    @property
    def layer_paths(self):
        return self.capture.layer_paths or []

    @property
    def writer(self):
        """The open `EventWriter`; None after a write failure until a new one opens."""
        return self._output.writer

    @property
    def run_dir(self):
        return self._output.run_dir

    def start(self):
        """Hooks the optimizer (the monitor then has the train function retraced)."""
        model = self.capture.model
        if model.built and not model.trainable_variables:
            raise ValueError("GradientMonitor found no trainable weights in the model: "
                             "there is no gradient to monitor.")
        self._take_over_stale_capture()
        self.capture.install()
        if self.capture.ready:
            self._check_layer_names()
            self._records_read = self.capture.state.records_written()
        self._start_iterations = _iterations(self.capture.optimizer)
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
        self._discard_output()

    def _discard_output(self):
        """Closes the writer and removes its file (only the header was written),
        and the run folder if that leaves it empty."""
        writer = self.writer
        self._output.writer = None
        if writer is None:
            return
        try:
            writer.close()
            os.remove(writer.path)
            os.rmdir(os.path.dirname(writer.path))  # fails, as it should, unless empty
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

    def _name_layers(self, writer):
        """Writes the layer order to a new event file, once the step was traced."""
        if self._layer_tags is not None:
            self._layers_event()[1](writer)

    @property
    def used(self):
        """The optimizer's step was traced with the hook (it applies gradients)."""
        return self.capture.traced and self.capture.ready

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
        pending = self._guard("write", self._take_pending, [])  # rows drained but not written yet
        if pending:
            self._output.write(pending)
        lines = self._guard("alerts", self._alert_log.close, [])
        if lines:
            step = int(self.capture.optimizer.iterations.numpy())
            self._output.write(writing.text_events(lines, step))
        self._guard("detach", self.capture.uninstall)
        if self.used or self._layer_tags is not None:
            self._output.close()
        else:  # nothing happened: nothing is left behind
            self._discard_output()

    # -- per drain -----------------------------------------------------------
    def drain(self, epoch, flush=False):
        """Reads the new records, logs alerts and writes them; never raises."""
        if self.closed:
            return
        self.last_epoch = epoch
        self._guard("drain", lambda: self._drain(epoch, flush))

    def _drain(self, epoch, flush):
        if not self.used:
            self._check_unused(flush)
            return
        events = []
        if self._layer_tags is None:
            events += self._begin_writing()
        steps, rows, total, lost = self.capture.state.read_since(
            self._records_read, self.capture.take_latest_record())
        self._records_read = total
        keeper = getattr(self.capture, "keeper", None)
        kept = self._guard("keep", keeper.take, []) if keeper is not None else []
        if self.capture.host_detector is not None:
            self.capture.host_detector.detect(rows)
            if keeper is not None:
                from gradwatch.culprits.keep import BOUND_FACTOR

                detector = self.capture.host_detector
                self._guard("keep", lambda: keeper.set_bound(BOUND_FACTOR * detector.next_threshold()))
        if lost:
            self._warn_once("lost", f"{lost} steps were overwritten on the device before being read; "
                                    "use a smaller `update_freq`.")
        if len(steps):
            if self._first_norms is not None:
                self._guard("clipping", lambda: self._remember_first_norms(steps, rows))
            self._pending.append((steps, rows))
            self._pending_rows += len(steps)
            notable = self._alert_log.burst is not None or _any_flag(rows, state.EXPLODED | state.CLIP_SWITCHED_ON)
            if notable:  # every step up to this one is written before an alert is logged
                events += self._take_pending()
                self._output.write(events, flush=True)
                events = []
                explosions, switches, lines = self._react(steps, rows, epoch, kept)
                alert_events = writing.alert_events(int(steps[-1]), explosions, switches, lines)
                if alert_events:
                    self._output.write(alert_events, flush=True)
            self._guard("clipping", lambda: self._follow_threshold(rows))
        urgent = False
        if self._vanishing:
            found = writing.vanishing_events(*self._guard(
                "vanishing", lambda: self._vanishing.feed(steps, rows, epoch, flush), ([], [])))
            events, urgent = events + found, bool(found)
        # A quiet batch waits, as rows, until a write is due: its events are
        # built and written together (one norms block per run of steps).
        due = flush or urgent or self._output.due(self._pending_rows)
        if due:
            events = self._take_pending() + events
        if events or flush:
            self._output.write(events, flush=due)

    def _remember_first_norms(self, steps, rows):
        """The first `restart_steps` healthy steps' global norms (those the detector's window took in)."""
        wanted = self.capture.policy.auto.restart_steps - len(self._first_norms)
        if wanted <= 0:
            return
        norms = rows[:, state.GLOBAL]
        flags = rows[:, state.FLAGS]
        healthy = np.isfinite(norms) & (norms > 0) & ~state.has_flag(flags, state.EXPLODED | state.OVERFLOW)
        self._first_norms += [(int(s), float(n)) for s, n in zip(steps[healthy], norms[healthy])][:wanted]

    def _take_pending(self):
        """The events of the rows waiting to be written (then forgotten)."""
        if not self._pending:
            return []
        steps = np.concatenate([part[0] for part in self._pending])
        rows = np.concatenate([part[1] for part in self._pending])
        self._pending, self._pending_rows = [], 0
        return writing.batch_events(steps, rows, self._layer_tags, self.capture.policy.clip_mode, [], [], [])

    def _react(self, steps, rows, epoch, kept=()):
        """`(explosions, clipping switches, alert lines)` of drained records;
        `kept`: the batches taken from the device (`gradwatch.culprits.keep`)."""
        if self._alert_log.burst is None and not state.has_flag(
                rows[:, state.FLAGS], state.EXPLODED | state.CLIP_SWITCHED_ON).any():
            return [], [], []  # a quiet batch: nothing to log
        explosions = alerts.explosions_from_records(
            steps, rows, self.layer_paths, epoch, self.monitor.top_layers, optimizer=self.capture.name)
        if self._book is not None and explosions:
            book = self._book
            keeper = self.capture.keeper
            explosions = self._guard(
                "rank", lambda: book.attach(explosions, kept, self.capture.keep_failure, keeper.slots), explosions)
            self._guard("keep", lambda: keeper.set_floor(book.floor()))
            for key, text in book.failures:
                self._warn_once(key, text)
            book.failures.clear()
        self.monitor.explosions.extend(explosions)
        by_step = {e.step: e for e in explosions}
        # Log in step order: the alerts up to the switch, the switch, the rest.
        switched = np.flatnonzero(state.has_flag(rows[:, state.FLAGS], state.CLIP_SWITCHED_ON))
        cut = int(switched[0]) + 1 if len(switched) else len(steps)
        lines = self._guard("alerts", lambda: self._alert_log.feed(steps[:cut], rows[:cut], by_step), [])
        switches = self._guard("clipping", lambda: self._clipping_switches(steps, rows, explosions, epoch), [])
        lines += self._guard("alerts", lambda: self._alert_log.feed(steps[cut:], rows[cut:], by_step), [])
        return explosions, switches, lines

    def _clipping_switches(self, steps, rows, explosions, epoch):
        switched = state.has_flag(rows[:, state.FLAGS], state.CLIP_SWITCHED_ON)
        events = []
        for index in np.flatnonzero(switched):
            step, threshold = int(steps[index]), float(rows[index, state.CLIP_THRESHOLD])
            mode = self.capture.policy.clip_mode
            setattr(self.capture.optimizer, mode, threshold)
            event = {"step": step, "epoch": int(epoch), "mode": mode,
                     "threshold": threshold, "cause_step": step}
            if state.has_flag(rows[index, state.FLAGS], state.RESTARTED):
                event["restarted"] = True  # the weights went back to those kept before this step:
                event["restart_step"] = state.kept_step(self.capture.state)  # (1: the first step)
            rejudged = not state.has_flag(rows[index, state.FLAGS], state.EXPLODED)
            if rejudged:
                # No explosion at this step: the first steps judged again (`AutoThreshold.rejudge_ratio`);
                # the cause is the largest of them (the alert gives its norm).
                event["rejudged"] = True
                event["cause_step"], largest = max(self._first_norms or [], key=lambda pair: pair[1],
                                                   default=(None, None))
            if self.capture.name is not None:
                event["optimizer"] = self.capture.name
            events.append(event)
            self.monitor.clipping_events.append(event)
            cause = largest if rejudged else next((e for e in explosions if e.step == step), None)
            policy = self.capture.policy
            self._alert_log.emit(alerts.switch_message(event, cause, policy.auto if policy.is_auto else None),
                                 {"gradwatch_clipping": event})
        return events

    def _follow_threshold(self, rows):
        """With `clip_threshold="auto"`, the optimizer's clipping attribute
        (`clipnorm`, `global_clipnorm` or `clipvalue`) holds the threshold of the
        latest drained step with clipping on: a saved model carries the latest."""
        policy = self.capture.policy
        if not (policy.is_auto and policy.auto_switch):
            return
        flags = rows[:, state.FLAGS]
        active = np.flatnonzero(state.has_flag(flags, state.CLIP_ACTIVE) & ~state.has_flag(flags, state.OVERFLOW))
        if len(active):
            setattr(self.capture.optimizer, policy.clip_mode, float(rows[active[-1], state.CLIP_THRESHOLD]))

    def has_kept(self):
        """The device holds a kept batch not read yet (one scalar read); never raises."""
        keeper = getattr(self.capture, "keeper", None)
        if keeper is None or not keeper.ready or self.closed:
            return False
        return bool(self._guard("keep", lambda: keeper.waiting() > 0, False))

    def _store_batch(self, record, step):
        """`culprits=True`: previews in the event record, the arrays in the run folder."""
        from gradwatch.culprits import store

        if record.culprits is not None:
            record.previews = store.previews(record.data, record.culprits)
        if self.run_dir and self.monitor._role.chief:
            path = store.write_batch(self.run_dir, step, record.data)
            if path is not None:
                record.arrays_path = os.path.relpath(path, self.run_dir)

    def _remove_batch(self, record):
        """A batch pushed out of the held ones (`gradwatch.culprits.book`): its arrays file goes too."""
        if record.arrays_path and self.run_dir:
            path = os.path.join(self.run_dir, record.arrays_path)
            if os.path.isfile(path):
                os.remove(path)
            record.arrays_path = None

    def _check_unused(self, flush):
        """The optimizer's hook has not run: was it used in a step traced before?"""
        start, now = self._start_iterations, _iterations(self.capture.optimizer)
        name = self.name
        if start is not None and now is not None and now > start:
            self._warn_once("traced_before", _TRACED_BEFORE.format(name=name, start=start, now=now))
        elif flush and self.report_unused:
            self._warn_once("no_gradient", NO_GRADIENT if self.capture.name is None
                            else _NEVER_APPLIED.format(name=name))

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


def _any_flag(rows, bits):
    """Whether a row of `rows` has one of the FLAGS `bits` (one row: no numpy op)."""
    if len(rows) == 1:
        return bool(int(rows[0, state.FLAGS]) & bits)
    return bool(state.has_flag(rows[:, state.FLAGS], bits).any())


def _iterations(optimizer):
    """The optimizer's step count, or None if it cannot be read."""
    try:
        return int(optimizer.iterations.numpy())
    except Exception:
        return None

"""Host side of one monitored `fit()`: drains the device records, logs alerts,
switches the optimizer's reported clipping on, and writes the summaries.

Nothing here may stop training: a failure is logged once as a warning and the
run goes on (the writer is reopened at the next drain).
"""

import logging
import math
import os

import numpy as np

from gradwatch import alerts, clipping, state, summaries, tags

logger = logging.getLogger("gradwatch")


_NO_GRADIENT = (
    "GradientMonitor saw no gradient: the optimizer was never called. A custom `train_step` "
    "must apply gradients with `self.optimizer.apply(...)` or `apply_gradients(...)`, and the "
    "model needs trainable weights.")


class Recorder:
    def __init__(self, monitor, capture, writer, print_fn):
        self.monitor = monitor
        self.capture = capture
        self.writer = writer
        self.print_fn = print_fn
        self._layer_tags = None
        self._records_read = 0
        self._alert_log = alerts.AlertLog(print_fn)
        self._warned = set()

    # -- lifecycle -----------------------------------------------------------
    @property
    def layer_paths(self):
        return self.capture.layer_paths or []

    def start(self):
        model = self.capture.model
        if model.built and not model.trainable_variables:
            raise ValueError("GradientMonitor found no trainable weights in the model: "
                             "there is no gradient to monitor.")
        self.capture.install()
        if self.capture.ready:
            self._check_layer_names()
        model.make_train_function(force=True)

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
        self._guard("write", lambda: self.writer.write_json(
            int(self.capture.optimizer.iterations.numpy()), tags.LAYERS, self.layer_paths))

    def close(self):
        self._guard("alerts", lambda: self._write_lines(self._alert_log.close(), None))
        self.capture.uninstall()
        self.capture.model.train_function = None  # the next fit() retraces without the hook
        self._guard("write", self.writer.close)

    # -- per drain -----------------------------------------------------------
    def drain(self, epoch, flush=False):
        self._guard("drain", lambda: self._drain(epoch, flush))

    def _drain(self, epoch, flush):
        if not self.capture.ready:
            if self.capture.traced or flush:
                self._warn_once("no_gradient", _NO_GRADIENT)
            return
        if self._layer_tags is None:
            self._begin_writing()
        steps, rows, total, lost = self.capture.state.read_since(self._records_read)
        self._records_read = total
        if lost:
            self._warn_once("lost", f"{lost} steps were overwritten on the device before being read; "
                                    "use a smaller `update_freq`.")
        if len(steps):
            explosions = alerts.explosions_from_records(
                steps, rows, self.layer_paths, epoch, self.monitor.top_layers)
            self.monitor.explosions.extend(explosions)
            lines = self._alert_log.feed(steps, rows, {e.step: e for e in explosions})
            switches = self._clipping_switches(steps, rows, explosions, epoch)
            self._guard("write", lambda: self._write(steps, rows, explosions, switches, lines))
        if flush:
            self._guard("write", self.writer.flush)

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
    def _write(self, steps, rows, explosions, switches, lines):
        clip_mode = self.capture.policy.clip_mode
        overflows = 0
        for step, row in zip(steps, rows):
            if int(row[state.FLAGS]) & state.OVERFLOW:
                overflows += 1  # the loss-scale optimizer skipped it: no norms
                continue
            values = self._row_values(row, clip_mode)
            if overflows:
                values[tags.OVERFLOW], overflows = float(overflows), 0
            self.writer.write_scalars(int(step), values)
        if overflows:  # skipped steps not yet followed by an update
            self.writer.write_scalars(int(steps[-1]), {tags.OVERFLOW: float(overflows)})
        last = int(steps[-1])
        if explosions:
            self.writer.write_json(last, tags.EXPLOSIONS, [e.to_json() for e in explosions])
        if switches:
            self.writer.write_json(last, tags.CLIPPING, switches)
        self._write_lines(lines, last)

    def _write_lines(self, lines, step):
        if lines:
            step = step if step is not None else int(self.capture.optimizer.iterations.numpy())
            self.writer.write_text(step, tags.ALERTS_TEXT, "\n\n".join(lines))

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
    def _guard(self, what, action):
        try:
            action()
        except Exception as error:  # monitoring must never stop training
            self._warn_once(what, f"gradwatch could not {what} ({type(error).__name__}: {error}); "
                                  "training goes on.")
            if what == "write":
                self._reopen_writer()

    def _reopen_writer(self):
        try:
            self.writer = summaries.EventWriter(os.path.dirname(self.writer.path))
        except Exception:
            pass

    def _warn_once(self, key, text):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(text)

"""Vanishing / dead-gradient alerts of a monitored `fit()`: the `Vanishing`
record, its log line, and the host-side watch fed with the drained records.

The maths is `gradwatch.vanishing` (pure); this module keeps its state for one
`fit()`, turns its onsets into records (`GradientMonitor.vanishing`) and one
WARNING per onset on the `"gradwatch"` logger (through `alerts.AlertLog`, with
the record as `record.gradwatch_vanishing`). A layer is named again only after
it recovered (an INFO line says so), so a vanishing layer never floods the log.
"""

import dataclasses
import logging
import math
from typing import Tuple

import numpy as np

from gradwatch import state, stats, vanishing

logger = logging.getLogger("gradwatch")
_NAMED_IN_LINE = 10  # layers named in one log line (the record has them all)
# Rows are scanned once this many are waiting, or when the recorder flushes
# (epoch ends, the end of training): a few us a step where scanning each step
# alone would cost ~150 us. With `update_freq=1`, alerts so wait at most as
# long as with the default `update_freq=100`.
SCAN_ROWS = 100


@dataclasses.dataclass(frozen=True)
class Vanishing:
    """Layers whose gradient started vanishing, or died, at one step.

    Attributes:
        step: optimizer iteration (counted from 1) at which the rule fired.
        epoch: the epoch, counted from 0 like Keras callbacks' `epoch`.
        kind: `"vanishing"` (per-parameter RMS orders of magnitude below the
            layers nearer the loss, for a window of steps) or `"dead"` (zero
            gradient for a sustained number of steps after a non-zero one).
        layers: `(layer path, gradient norm at that step)`, model order.
        detail: per layer, for `"vanishing"` the depth gap (orders of
            magnitude, negative: below the layers after it), for `"dead"` the
            number of zero-gradient steps in a row.
    """

    step: int
    epoch: int
    kind: str
    layers: Tuple[Tuple[str, float], ...]
    detail: Tuple[float, ...] = ()

    def to_json(self):
        from gradwatch.summaries import json_safe

        return {"step": self.step, "epoch": self.epoch, "kind": self.kind,
                "layers": [[path, json_safe(norm)] for path, norm in self.layers],
                "detail": [json_safe(value) for value in self.detail]}


def message(record, config):
    """One alert line, e.g. `vanishing gradient in d0, d1 at step 100 (epoch 1): ...`."""
    names = [path for path, _ in record.layers]
    shown = ", ".join(names[:_NAMED_IN_LINE]) + (
        f" and {len(names) - _NAMED_IN_LINE} more" if len(names) > _NAMED_IN_LINE else "")
    where = f"at step {record.step} (epoch {record.epoch + 1})"
    if record.kind == vanishing.DEAD:
        runs = ", ".join(f"{path} {int(run)}" for (path, _), run in list(zip(record.layers, record.detail))[:_NAMED_IN_LINE])
        return (f"dead gradient in {shown} {where}: zero (below float32 resolution) for the last steps "
                f"after being non-zero; zero steps in a row: {runs}")
    gaps = ", ".join(f"{path} {_num(norm)} ({-gap:.1f})" for (path, norm), gap in
                     list(zip(record.layers, record.detail))[:_NAMED_IN_LINE])
    return (f"vanishing gradient in {shown} {where}: per-parameter gradient RMS at least "
            f"{config.orders:g} orders of magnitude below the layers nearer the loss for "
            f"{config.window} steps; norm (orders below): {gaps}")


def _num(value):
    return f"{value:.3g}" if math.isfinite(value) else str(value)


class VanishingWatch:
    """Feeds drained records to `gradwatch.vanishing` for one `fit()`.

    Args:
        config: a `vanishing.VanishingConfig`.
        capture: the run's capture (layer paths, model, sparse layers).
        alert_log: the recorder's `alerts.AlertLog` (logs and prints).
        found: a list the records are appended to (`GradientMonitor.vanishing`).
    """

    def __init__(self, config, capture, alert_log, found):
        self.config, self.capture, self.alert_log, self.found = config, capture, alert_log, found
        self.state = None
        self._pending, self._pending_rows = [], 0  # (steps, rows, epochs) not scanned yet

    def _start(self):
        paths = list(self.capture.layer_paths)
        model_paths, layer_of_variable = stats.layer_paths(
            self.capture.model, sublayers=getattr(self.capture, "sublayers", 0))
        if model_paths == paths:
            self.sizes = vanishing.layer_sizes(self.capture.model.trainable_variables, layer_of_variable, len(paths))
        else:  # the model changed since it was traced: sizes unknown, compare norms
            self.sizes = np.ones(len(paths), np.int64)
        self.paths = paths
        self.state = vanishing.init(len(paths))

    def feed(self, steps, rows, epoch, flush=False):
        """`(records, alert lines)` of the drained batches (`gradwatch.state` rows)
        scanned now: when `SCAN_ROWS` are waiting, or at a `flush`."""
        if len(steps):
            self._pending.append((steps, rows, int(epoch)))
            self._pending_rows += len(steps)
        if not self._pending or (not flush and self._pending_rows < SCAN_ROWS):
            return [], []
        steps = np.concatenate([part[0] for part in self._pending])
        rows = np.concatenate([part[1] for part in self._pending])
        epochs = np.concatenate([np.full(len(part[0]), part[2]) for part in self._pending])
        self._pending, self._pending_rows = [], 0
        if self.state is None:
            self._start()
        sparse = np.zeros(len(self.paths), bool)
        sparse[[i for i in self.capture.sparse_layers if i < len(self.paths)]] = True
        steps_ok = ~state.has_flag(rows[:, state.FLAGS], state.OVERFLOW)
        norms = rows[:, state.LAYERS_START:state.LAYERS_START + len(self.paths)]
        self.state, events = vanishing.scan(self.state, norms, self.sizes, sparse, self.config, steps_ok)
        records, lines = [], []
        for event in events:
            step = int(steps[event.row])
            if not event.onset:
                names = [self.paths[i] for i in event.layers]
                logger.info("gradwatch: the gradient of %s is no longer %s at step %d.", ", ".join(names),
                            event.kind, step, extra={"gradwatch_recovered": (event.kind, step, names)})
                continue
            record = Vanishing(step=step, epoch=int(epochs[event.row]), kind=event.kind,
                               layers=tuple((self.paths[i], float(norms[event.row, i])) for i in event.layers),
                               detail=tuple(float(v) for v in event.values))
            records.append(record)
            self.found.append(record)
            lines.append(self.alert_log.emit(message(record, self.config), {"gradwatch_vanishing": record}))
        return records, lines

"""Explosion records, alert lines and burst summaries.

The only module that logs alerts (logger `"gradwatch"`). A burst of
consecutive exploding steps is logged as its first explosion in full, then a
summary every `summary_every` explosions and when the burst ends; every
explosion is still kept in `GradientMonitor.explosions` and TensorBoard.
"""

import dataclasses
import logging
import math
from typing import Any, List, Optional, Tuple

import numpy as np

from gradwatch import state, tags
from gradwatch.culprits import ranking

logger = logging.getLogger("gradwatch")
logger.addHandler(logging.NullHandler())


@dataclasses.dataclass(frozen=True)
class Explosion:
    """One exploding step.

    Attributes:
        step: optimizer iteration after the update, counted from 1.
        epoch: the epoch, counted from 0 like Keras callbacks' `epoch`
            (log lines show it from 1, like Keras' progress bar).
        global_norm: global gradient norm before clipping (may be NaN/Inf).
        threshold: the explosion threshold in force at that step.
        layers: top offending layers as `(layer path, norm)`, largest first,
            NaN/Inf first.
        action: one of `"none"`, `"clipping_on"`, `"clipped"`, `"skipped"`.
        nonfinite: the gradient held NaN or Inf.
        optimizer: the name of the optimizer whose step exploded when the
            monitor watches several (`GradientMonitor(optimizers=...)`), else None.
        culprits: the samples of the step's batch as `gradwatch.Culprit`
            records, largest gradient norm first, NaN/Inf first; None when the
            batch was not kept or not ranked (`GradientMonitor(culprits=...)`;
            `batch()` then says why).
    """

    step: int
    epoch: int
    global_norm: float
    threshold: float
    layers: Tuple[Tuple[str, float], ...]
    action: str
    nonfinite: bool = False
    optimizer: Optional[str] = None
    culprits: Optional[List[ranking.Culprit]] = None
    _kept: Any = dataclasses.field(default=None, repr=False, compare=False)

    def batch(self):
        """The step's batch as NumPy `(x, y, sample_weight)`, as
        `keras.utils.unpack_x_y_sample_weight` gives them (None for absent parts;
        dicts and tuples kept); `x[culprit.index]` is a culprit's input.

        Raises:
            gradwatch.BatchNotKeptError: the batch was not kept, or no longer
                is; the message says why.
        """
        kept = self._kept
        if kept is None or kept.data is None:
            reason = kept.reason if kept is not None and kept.reason else (
                "no batch is kept for this explosion (GradientMonitor(culprits=False), or "
                "the record was read back from a log file)")
            raise ranking.BatchNotKeptError(f"The batch of the explosion at step {self.step} was not kept: {reason}.")
        return ranking.unpack(kept.data)

    @property
    def culprits_note(self):
        """Why `culprits` is None, or None."""
        if self.culprits is not None:
            return None
        return self._kept.reason if self._kept is not None else None

    def to_json(self):
        from gradwatch.summaries import json_safe

        record = {"step": self.step, "epoch": self.epoch,
                  "global_norm": json_safe(self.global_norm), "threshold": json_safe(self.threshold),
                  "layers": [[path, json_safe(norm)] for path, norm in self.layers],
                  "action": self.action, "nonfinite": self.nonfinite}
        if self.optimizer is not None:
            record["optimizer"] = self.optimizer
        if self.culprits is not None:
            previews = getattr(self._kept, "previews", None) or {}
            docs = []
            for culprit in self.culprits[:ranking.WRITTEN]:
                doc = culprit.to_json()
                if culprit.index in previews:
                    doc["preview"] = previews[culprit.index]
                docs.append(doc)
            record["culprits"] = docs
            record["batch_size"] = len(self.culprits)
            record["culprits_summary"] = ranking.describe(self.culprits)
            arrays = getattr(self._kept, "arrays_path", None)
            if arrays:
                record["culprits_arrays"] = arrays
        return record


def top_layers(layer_norms, layer_paths, count):
    """`(path, norm)` of the `count` largest norms; NaN/Inf first."""
    norms = np.asarray(layer_norms, dtype=np.float64)
    rank = np.where(np.isfinite(norms), norms, np.inf)
    order = sorted(range(len(norms)), key=lambda i: (-rank[i], i))[:count]
    return tuple((layer_paths[i], float(norms[i])) for i in order)


def action_of(flags):
    flags = int(flags)
    if flags & state.SKIPPED:
        return tags.ACTION_SKIPPED
    if flags & state.CLIP_SWITCHED_ON:
        return tags.ACTION_CLIP_ON
    if flags & state.CLIP_ACTIVE:
        return tags.ACTION_CLIPPED
    return tags.ACTION_NONE


def explosions_from_records(steps, rows, layer_paths, epoch, top_count, optimizer=None):
    """Explosion records of the exploded rows of a drained record batch."""
    found = []
    for step, row in zip(steps, rows):
        flags = int(row[state.FLAGS])
        if not flags & state.EXPLODED:
            continue
        found.append(Explosion(
            step=int(step), epoch=int(epoch), global_norm=float(row[state.GLOBAL]),
            threshold=float(row[state.THRESHOLD]),
            layers=top_layers(row[state.LAYERS_START:], layer_paths, top_count),
            action=action_of(flags), nonfinite=bool(flags & state.NONFINITE), optimizer=optimizer))
    return found


def _num(value):
    return f"{value:.3g}" if math.isfinite(value) else str(value)


_ACTION_TEXT = {tags.ACTION_NONE: "", tags.ACTION_CLIP_ON: "; clipping switched on",
                tags.ACTION_CLIPPED: "; clipped", tags.ACTION_SKIPPED: "; update skipped"}


def explosion_message(record):
    """One alert line, e.g. `gradient explosion at step 1234 (epoch 3): ...`."""
    where = f"at step {record.step} (epoch {record.epoch + 1})"
    layers = ", ".join(f"{path} {_num(norm)}" for path, norm in record.layers)
    if record.nonfinite:
        bad = [path for path, norm in record.layers if not math.isfinite(norm)]
        text = (f"NaN/Inf gradient in {', '.join(bad) or 'the model'} {where}: "
                f"global norm {_num(record.global_norm)}; top layers: {layers}")
    else:
        text = (f"gradient explosion {where}: global norm {_num(record.global_norm)} "
                f"> threshold {_num(record.threshold)}; top layers: {layers}")
    if record.culprits is not None:
        text += "; " + ranking.describe(record.culprits)
    return text + _ACTION_TEXT[record.action]


def switch_message(event, cause, auto):
    """The line logged when clipping switches on (`event` from the recorder);
    `cause`: the explosion at the switching step, or, when the first steps were
    judged again (`event["rejudged"]`), the global norm of `event["cause_step"]`
    (None if unknown); `auto`: the `clipping.AutoThreshold` of
    `clip_threshold="auto"`, or None."""
    how = f" ({auto_description(event['mode'], auto)})" if auto is not None else ""
    text = (f"switched on {event['mode']}={event['threshold']:.4g}{how} at step "
            f"{event['step']} (that step included)")
    rejudged = event.get("rejudged")
    if rejudged:
        ratio = f" {auto.rejudge_ratio:g}x" if auto is not None else ""
        which = (f"step {event['cause_step']} (global norm {cause:.3g})" if event.get("cause_step") is not None
                 and cause is not None else "one of them")
        text += (f", after the run's first steps were judged again against its first full window of healthy "
                 f"steps: {which} was at least{ratio} their typical norm, an explosion the warm-up could not see")
    elif cause is not None:
        text += f", after the gradient explosion at step {cause.step} (global norm {cause.global_norm:.3g})"
    if event.get("restarted"):
        kept = event.get("restart_step")
        if isinstance(kept, int) and kept > 1:  # (judged again: only with a short `rollback_steps`)
            text += (f"; the run goes back to the weights it had before step {kept} (the last kept), clipped"
                     if rejudged else
                     f"; the run rolls back to the weights it had before step {kept} (the last kept, at a quiet "
                     "step: the norms were already building up before this one), clipped")
        elif rejudged:  # the cause said why already
            text += "; the run restarts from the weights it had before its first step, clipped"
        else:
            steps = f" {auto.restart_steps}" if auto is not None else ""
            text += (f"; in trouble within its first{steps} healthy steps, the run restarts from the weights it had "
                     "before its first step, clipped")
    return text


def auto_description(mode, auto):
    """What the "auto" threshold is, in words."""
    statistic = {"clipnorm": "each variable's gradient norm" if auto.per_variable else "the variables' gradient norms",
                 "global_clipnorm": "the global norm",
                 "clipvalue": "the root-mean-square gradient entry"}[mode]
    where = ("per variable, " if mode == "clipnorm" and auto.per_variable else "")
    if not auto.follow:
        return f"{where}the {auto.percentile:g}th percentile of {statistic} over the last {auto.window} healthy steps"
    bound = "never above this first value" if auto.rise == 1 else f"never above {auto.rise:g}x this first value"
    shrink = ", lower while clipped norms keep doubling" if auto.shrink < 1 else ""
    if auto.shrink < 1 and auto.elevation != float("inf"):
        shrink += f" or the typical norm stays {auto.elevation:g}x the one at the switch"
    watched = " or ".join(words for words, on in (("overshoots", auto.overshoot_gain > 0),
                                                  (f"moves the weights by over {auto.update_ratio:.3g} of their norm",
                                                   auto.update_gain > 0)) if on)
    if watched:
        shrink += (" or" if shrink else ", lower") + f" while each update {watched}"
    return (f"it follows the run: {where}the {auto.percentile:g}th percentile of {statistic} over the last "
            f"{auto.window} healthy steps, updated every step, {bound}{shrink}")


@dataclasses.dataclass
class Burst:
    """Consecutive exploding steps."""

    first_step: int
    last_step: int
    count: int
    worst_norm: float

    def add(self, record):
        self.last_step, self.count = record.step, self.count + 1
        if _worse(record.global_norm, self.worst_norm):
            self.worst_norm = record.global_norm

    def message(self, ended):
        state_text = "ended" if ended else "ongoing"
        return (f"gradient explosion burst {state_text}: {self.count} exploding steps "
                f"in steps {self.first_step}-{self.last_step}, worst global norm {_num(self.worst_norm)}")


def _worse(norm, than):
    return math.isnan(norm) or (not math.isnan(than) and norm > than)


# The `extra` keys of the monitor's alert log records: explosions, bursts,
# clipping switches, vanishing/dead layers and their recoveries.
ALERT_KEYS = ("gradwatch_explosion", "gradwatch_burst", "gradwatch_clipping", "gradwatch_vanishing",
              "gradwatch_recovered")


class MuteAlerts(logging.Filter):
    """A `logging.Filter` that drops the monitor's alert records (`ALERT_KEYS`)."""

    def filter(self, record):
        return not any(hasattr(record, key) for key in ALERT_KEYS)


class AlertLog:
    """Turns the drained records into log lines, rate-limiting bursts.

    `feed` returns the lines it logged, for the TensorBoard text summary.
    `label`: the optimizer's name, put in front of every line (`[name] ...`)
    when the monitor watches several.
    """

    def __init__(self, print_fn: Optional[callable], summary_every=100, label=None):
        self.print_fn = print_fn
        self.label = label
        self.summary_every = summary_every
        self.burst: Optional[Burst] = None

    def feed(self, steps, rows, records_by_step) -> List[str]:
        lines = []
        for step, row in zip(steps, rows):
            flags = int(row[state.FLAGS])
            if flags & state.OVERFLOW:
                continue
            record = records_by_step.get(int(step)) if flags & state.EXPLODED else None
            if record is None:
                lines += self.close()
            elif self.burst is None:
                self.burst = Burst(record.step, record.step, 1, record.global_norm)
                lines.append(self.emit(explosion_message(record), {"gradwatch_explosion": record}))
            else:
                self.burst.add(record)
                if self.burst.count % self.summary_every == 0:
                    lines.append(self.emit(self.burst.message(False), {"gradwatch_burst": self.burst}))
        return lines

    def close(self):
        burst, self.burst = self.burst, None
        if burst is None or burst.count == 1:
            return []
        return [self.emit(burst.message(True), {"gradwatch_burst": burst})]

    def emit(self, text, extra):
        """Logs `text` (WARNING, with `extra`) and prints it if printing; returns it."""
        if self.label is not None:
            text = f"[{self.label}] {text}"
        logger.warning(text, extra=extra)
        if self.print_fn is not None:
            self.print_fn("gradwatch: " + text)
        return text

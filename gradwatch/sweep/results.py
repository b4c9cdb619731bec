"""The results of a clipping sweep, read back from its log folder.

Shared by `ClippingSweep.search` and `gradwatch report`; imports neither
TensorFlow nor KerasTuner. A sweep folder holds `SWEEP_FILE` (the sweep's
settings: objective, modes, thresholds and why) and KerasTuner's project
folder `TUNER_PROJECT`, whose `trial_*/trial.json` files are the trials'
results store (hyperparameter values, metrics, status).
"""

import dataclasses
import json
import math
import os
from typing import Optional, Tuple

SWEEP_FILE = "gradwatch_sweep.json"
TUNER_PROJECT = "keras_tuner"
PROBE_RUN = "probe"

# Hyperparameter names (KerasTuner and the HParams tab).
HP_MODE = "mode"
HP_THRESHOLD = "threshold"
NO_CLIPPING = "none"
# Metrics reported to KerasTuner besides the objective.
M_DIVERGED = "diverged"
M_EXPLOSIONS = "explosions"
M_STEPS = "steps"


class SweepReadError(Exception):
    """A sweep folder whose files cannot be read; the message names the file."""


def trial_clipping(values):
    """`(mode, threshold)` of a trial's hyperparameter values; `(None, None)`
    for the no-clipping trial. KerasTuner keeps each mode's threshold under the
    mode's own name (conditional on `mode`)."""
    mode = values.get(HP_MODE)
    if mode in (None, NO_CLIPPING):
        return None, None
    return mode, float(values[mode])


def trial_folder(trial_id, mode, threshold):
    """The trial's log folder name under the sweep's `log_dir`, e.g.
    `trial_03-clipnorm=0.3`.

    >>> trial_folder("00", None, None), trial_folder("03", "clipnorm", 0.3)
    ('trial_00-none', 'trial_03-clipnorm=0.3')
    """
    if mode is None:
        return f"trial_{trial_id}-{NO_CLIPPING}"
    return f"trial_{trial_id}-{mode}={threshold:g}"


@dataclasses.dataclass(frozen=True)
class SweepTrial:
    """One trial of a sweep.

    Attributes:
        trial_id: KerasTuner's trial id.
        mode: `"clipvalue"`, `"clipnorm"`, `"global_clipnorm"`, or None for the
            trial without clipping.
        threshold: the clipping threshold (None without clipping).
        value: the objective at the trial's best epoch; for a diverged trial
            the worst possible value (`inf` when minimising, `-inf` when
            maximising), so it ranks last here and in KerasTuner alike; NaN for
            a trial that did not complete.
        diverged: the loss became NaN/Inf (training stopped at once), or the
            objective was never finite.
        explosions: explosions gradwatch's monitor saw in the trial.
        steps: training steps run.
        log_dir: the trial's log folder (its gradwatch run is `log_dir/train`).
        status: KerasTuner's status ("COMPLETED", "FAILED", "RUNNING", ...).
    """

    trial_id: str
    mode: Optional[str]
    threshold: Optional[float]
    value: float
    diverged: bool
    explosions: int
    steps: int
    log_dir: str
    status: str = "COMPLETED"

    @property
    def name(self):
        """`"clipnorm=0.3"`, or `"no clipping"`."""
        return "no clipping" if self.mode is None else f"{self.mode}={self.threshold:g}"

    def to_json(self):
        return {"trial_id": self.trial_id, "mode": self.mode, "threshold": self.threshold,
                "value": _json_number(self.value), "diverged": self.diverged,
                "explosions": self.explosions, "steps": self.steps,
                "log_dir": self.log_dir, "status": self.status}


def _json_number(value):
    return value if math.isfinite(value) else ("nan" if math.isnan(value) else
                                               ("inf" if value > 0 else "-inf"))


@dataclasses.dataclass(frozen=True)
class SweepResults:
    """The trials of a sweep, in trial order, and the best of them.

    Printing it gives a table, best first.
    """

    objective: str
    direction: str  # "min" or "max"
    trials: Tuple[SweepTrial, ...]
    thresholds: dict = dataclasses.field(default_factory=dict)  # {mode: [{value, rule, ...}]}
    log_dir: str = ""

    def _rank_key(self, trial):
        completed = trial.status == "COMPLETED" and not math.isnan(trial.value)
        value = trial.value if completed else math.inf
        return (not completed, trial.diverged, value if self.direction == "min" else -value)

    def ranked(self):
        """Trials best first: completed before failed, finite before diverged,
        then by objective."""
        return sorted(self.trials, key=self._rank_key)

    @property
    def best(self):
        """The trial with the best objective among those that did not diverge,
        or None."""
        candidates = [t for t in self.ranked() if t.status == "COMPLETED" and not t.diverged]
        return candidates[0] if candidates else None

    @property
    def baseline(self):
        """The trial without clipping, or None."""
        return next((t for t in self.trials if t.mode is None), None)

    def recommendation(self):
        """One line: the best trial and how it compares with no clipping."""
        best, baseline = self.best, self.baseline
        if best is None:
            return "No trial finished without diverging: try lower thresholds or a lower learning rate."
        line = f"{best.name}: {self.objective} {best.value:.4g}"
        if best is baseline:
            return line + " (no clipping is best here)"
        if baseline is None or baseline.status != "COMPLETED":
            return line
        if baseline.diverged:
            return line + ", where no clipping diverged"
        if self.direction == "min" and best.value > 0 and baseline.value > 0:
            return line + f", {baseline.value / best.value:.3g}x better than no clipping ({baseline.value:.4g})"
        return line + f", against {baseline.value:.4g} without clipping"

    def table(self):
        """The trials as aligned text, best first."""
        header = ["rank", "trial", "clipping", self.objective, "diverged", "explosions", "steps", "log folder"]
        rows = []
        for rank, trial in enumerate(self.ranked(), start=1):
            value = "-" if math.isnan(trial.value) else f"{trial.value:.4g}"
            status = "yes" if trial.diverged else ("no" if trial.status == "COMPLETED" else trial.status.lower())
            rows.append([str(rank), trial.trial_id, trial.name, value, status, str(trial.explosions),
                         str(trial.steps), os.path.basename(trial.log_dir)])
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                         for row in [header] + rows)

    def __str__(self):
        return (f"Clipping sweep of {self.log_dir or 'this run'} ({self.objective}, "
                f"{'lower' if self.direction == 'min' else 'higher'} is better; {len(self.trials)} trials)\n"
                f"{self.table()}\nbest: {self.recommendation()}")

    def to_json(self):
        best = self.best
        return {"objective": self.objective, "direction": self.direction,
                "trials": [t.to_json() for t in self.ranked()],
                "best": None if best is None else best.to_json(),
                "recommendation": self.recommendation(),
                "thresholds": self.thresholds}


def is_sweep_folder(log_dir):
    return os.path.isfile(os.path.join(log_dir, SWEEP_FILE))


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError, RecursionError) as error:
        raise SweepReadError(f"cannot read {path}: {error}") from None


def read_settings(log_dir):
    """The sweep's settings (`SWEEP_FILE`), a dict."""
    settings = _load_json(os.path.join(log_dir, SWEEP_FILE))
    if not isinstance(settings, dict) or not isinstance(settings.get("objective"), dict):
        raise SweepReadError(f"{os.path.join(log_dir, SWEEP_FILE)} is not a gradwatch sweep file")
    return settings


def _metric(trial_doc, name):
    """The last observed value of a KerasTuner metric in a trial.json, or None."""
    try:
        observations = trial_doc["metrics"]["metrics"][name]["observations"]
        return float(observations[-1]["value"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _trial_from_doc(log_dir, doc):
    values = doc["hyperparameters"]["values"]
    mode, threshold = trial_clipping(values)
    trial_id = str(doc["trial_id"])
    return trial_id, mode, threshold, os.path.join(log_dir, trial_folder(trial_id, mode, threshold))


def read_results(log_dir):
    """`SweepResults` of the sweep in `log_dir` (trials as KerasTuner stored them)."""
    settings = read_settings(log_dir)
    objective = settings["objective"]
    project = os.path.join(log_dir, TUNER_PROJECT)
    trials = []
    names = sorted(os.listdir(project)) if os.path.isdir(project) else []
    for name in names:
        path = os.path.join(project, name, "trial.json")
        if not (name.startswith("trial_") and os.path.isfile(path)):
            continue
        doc = _load_json(path)
        try:
            trial_id, mode, threshold, folder = _trial_from_doc(log_dir, doc)
            status = str(doc.get("status") or "")
        except (KeyError, TypeError, ValueError) as error:
            raise SweepReadError(f"unexpected trial format in {path} ({error!r})") from None
        value = _metric(doc, objective["name"])
        diverged = _metric(doc, M_DIVERGED)
        trials.append(SweepTrial(
            trial_id=trial_id, mode=mode, threshold=threshold,
            value=math.nan if value is None else value,
            diverged=bool(diverged), explosions=int(_metric(doc, M_EXPLOSIONS) or 0),
            steps=int(_metric(doc, M_STEPS) or 0), log_dir=folder, status=status))
    trials.sort(key=lambda t: (len(t.trial_id), t.trial_id))
    return SweepResults(objective=str(objective["name"]), direction=str(objective["direction"]),
                        trials=tuple(trials), thresholds=settings.get("thresholds", {}), log_dir=log_dir)

"""The host side of culprits for one recorder: matches the batches taken from
the device to the explosions the host found, ranks them, bounds what is kept.

Bounds, per `fit()` and optimizer (a NaN storm, where every step explodes,
keeps no more): the batches of the first `FIRST_KEPT` exploding steps the device
kept, and of the `WORST_KEPT` worst later ones -- largest global norm, NaN/Inf
worst, the earlier kept among equals. A later batch is ranked only when it is
worse than the least bad of the worst few, which it then replaces: the replaced
batch's arrays (and its file) are dropped, its ranking (already in its alert and
the logs) stays. Other explosions have `culprits` None and `batch()` says why.
Once the worst few are full, `floor()` is the norm a step must reach to enter
them: the recorder makes it the device's bound too (`BatchKeeper.set_floor`),
so the device's slots wait for a worse step instead of filling with the next
ones. At most `MAX_RANKED` batches are ranked per `fit()` (a time bound, for a
run whose norms keep growing).
"""

import dataclasses
import math

from gradwatch.culprits import keep, ranking

FIRST_KEPT = 8
WORST_KEPT = 4
MAX_RANKED = 64

_STORM = (f"not kept: per fit() the batches of the first {FIRST_KEPT} exploding steps and of the "
          f"{WORST_KEPT} worst later ones (largest global norm, NaN/Inf worst) are kept, and this one "
          "was not worse than those")


def _badness(norm):
    return math.inf if not math.isfinite(norm) else norm


class CulpritBook:
    def __init__(self, model, on_ranked=None, on_dropped=None):
        self.model = model
        self.on_ranked = on_ranked  # called with (record, step) for a kept batch: the run folder
        self.on_dropped = on_dropped  # called with a record whose arrays were pushed out
        self.first, self.worst = [], []  # KeptRecords holding arrays
        self.ranked = 0
        self._compiled = {}  # per_sample's compiled function, traced once per fit()
        self.failures = []  # (key, message) to log once

    def floor(self):
        """The global norm a later exploding step must exceed to be kept (0 while
        the first few or the worst few are not full; inf when the worst are NaN/Inf)."""
        if len(self.first) < FIRST_KEPT or len(self.worst) < WORST_KEPT:
            return 0.0
        return min(r.norm for r in self.worst)

    def admits(self, norm):
        """A kept batch of this global norm is held (and ranked)."""
        if len(self.first) < FIRST_KEPT or len(self.worst) < WORST_KEPT:
            return True
        return _badness(norm) > self.floor()

    def attach(self, explosions, kept_batches, failure, slots=keep.SLOTS):
        """`explosions` with `culprits` and their kept batch (a new list)."""
        from gradwatch.culprits.per_sample import CannotRank, data_size, per_sample

        by_step = {k.step: k for k in kept_batches}
        full = len(kept_batches) >= slots
        result = []
        for explosion in explosions:
            kept = by_step.get(explosion.step)
            culprits = None
            if kept is None:
                if failure:
                    reason = failure
                    self.failures.append(("keep", f"gradwatch could not keep an exploding step's batch: {failure}"))
                elif not self.admits(explosion.global_norm):
                    reason = _STORM
                elif full:
                    reason = (f"the first {slots} exploding steps between two reads of the device "
                              "(8 steps apart while batches are kept) are kept, and this one came after them")
                else:
                    reason = ("the step did not reach the in-step bound (the host's threshold at the last "
                              "read of the device): see gradwatch.culprits.keep")
                record = ranking.KeptRecord(None, reason)
            elif not self.admits(explosion.global_norm):
                record = ranking.KeptRecord(None, _STORM)
            elif self.ranked >= MAX_RANKED:
                record = ranking.KeptRecord(None, f"not ranked: {MAX_RANKED} batches were already ranked in this fit()")
            else:
                self.ranked += 1
                record = ranking.KeptRecord(kept.data)
                try:
                    losses, norms = per_sample(self.model, kept, self._compiled)
                    x, y, _ = ranking.unpack(kept.data)
                    culprits = ranking.rank(losses, norms, data_size(x, y, len(losses)))
                except CannotRank as error:
                    record.reason = f"its samples were not ranked: {error}"
                except Exception as error:  # monitoring must never stop training
                    record.reason = f"ranking failed ({type(error).__name__}: {error})"
                    self.failures.append(("rank", f"gradwatch could not rank an exploding batch's samples "
                                                  f"({type(error).__name__}: {error}); training goes on."))
                record.culprits = culprits
                if self.on_ranked is not None:
                    try:
                        self.on_ranked(record, explosion.step)
                    except Exception as error:  # monitoring must never stop training
                        self.failures.append(("store", f"gradwatch could not write an exploding batch to the "
                                                       f"run folder ({type(error).__name__}: {error}); training "
                                                       "goes on."))
                self._hold(record, explosion.global_norm)
            result.append(dataclasses.replace(explosion, culprits=culprits, _kept=record))
        return result

    def _hold(self, record, norm):
        """Holds `record`'s arrays: among the first few, or the worst few (then
        the least bad of those, the latest among equals, is dropped)."""
        record.norm = _badness(norm)
        if len(self.first) < FIRST_KEPT:
            self.first.append(record)
            return
        self.worst.append(record)
        if len(self.worst) <= WORST_KEPT:
            return
        least = min(self.worst, key=lambda r: r.norm)
        least = [r for r in self.worst if r.norm == least.norm][-1]
        self.worst.remove(least)
        least.data = None
        least.reason = (f"dropped: the arrays of the first {FIRST_KEPT} and the {WORST_KEPT} worst kept "
                        "batches are held (its ranking is kept)")
        if self.on_dropped is not None and least is not record:
            try:
                self.on_dropped(least)
            except Exception as error:  # monitoring must never stop training
                self.failures.append(("store", f"gradwatch could not remove a dropped batch's file "
                                               f"({type(error).__name__}: {error}); training goes on."))

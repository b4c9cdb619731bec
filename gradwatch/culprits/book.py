"""The host side of culprits for one recorder: matches the batches taken from
the device to the explosions the host found, ranks them, bounds what is kept.

Bounds (per `fit()` and optimizer): every kept batch is ranked, up to
`MAX_RANKED`; the arrays of every ranked batch are held in memory
(`Explosion.batch()`) while they total at most `HELD_BYTES`; beyond, those of
the first `FIRST_KEPT` kept batches, plus those of the `WORST_KEPT` worst later
ones (largest global norm, NaN/Inf worst); a batch pushed out keeps its ranking
and `batch()` says it was dropped.
"""

import dataclasses
import math

from gradwatch.culprits import keep, ranking

FIRST_KEPT = 8
WORST_KEPT = 4
MAX_RANKED = 64
HELD_BYTES = 64 * 2**20


def _nbytes(data):
    import numpy as np

    from gradwatch.culprits.store import named_arrays

    try:
        return sum(np.asarray(a).nbytes for _, a in named_arrays(data))
    except Exception:
        return HELD_BYTES + 1


def _badness(norm):
    return math.inf if not math.isfinite(norm) else norm


class CulpritBook:
    def __init__(self, model, on_ranked=None, on_dropped=None):
        self.model = model
        self.on_ranked = on_ranked  # called with (record, step) for a held batch: the run folder
        self.on_dropped = on_dropped  # called with a record whose arrays were pushed out
        self.first, self.worst = [], []  # KeptRecords holding arrays
        self.small_bytes = 0  # arrays held under HELD_BYTES (never dropped)
        self.ranked = 0
        self._compiled = {}  # per_sample's compiled function, traced once per fit()
        self.failures = []  # (key, message) to log once

    def attach(self, explosions, kept_batches, failure):
        """`explosions` with `culprits` and their kept batch (a new list)."""
        from gradwatch.culprits.per_sample import CannotRank, data_size, per_sample

        by_step = {k.step: k for k in kept_batches}
        full = len(kept_batches) >= keep.SLOTS
        result = []
        for explosion in explosions:
            kept = by_step.get(explosion.step)
            culprits = None
            if kept is None:
                if failure:
                    reason = failure
                    self.failures.append(("keep", f"gradwatch could not keep an exploding step's batch: {failure}"))
                elif full:
                    reason = (f"the first {keep.SLOTS} exploding steps between two reads of the device "
                              "(8 steps apart while batches are kept) are kept, and this one came after them")
                else:
                    reason = ("the step did not reach the in-step bound (the host's threshold at the last "
                              "read of the device): see gradwatch.culprits.keep")
                record = ranking.KeptRecord(None, reason)
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
                self._hold(record, explosion.global_norm)
            if kept is not None and self.on_ranked is not None and record.data is not None:
                try:
                    self.on_ranked(record, explosion.step)
                except Exception as error:  # monitoring must never stop training
                    self.failures.append(("store", f"gradwatch could not write an exploding batch to the run "
                                                   f"folder ({type(error).__name__}: {error}); training goes on."))
            result.append(dataclasses.replace(explosion, culprits=culprits, _kept=record))
        return result

    def _hold(self, record, norm):
        """Keeps `record`'s arrays within the bounds (or drops them)."""
        record.norm = _badness(norm)
        size = _nbytes(record.data)
        if self.small_bytes + size <= HELD_BYTES:
            self.small_bytes += size
            return
        if len(self.first) < FIRST_KEPT:
            self.first.append(record)
            return
        self.worst.append(record)
        if len(self.worst) > WORST_KEPT:
            least = min(self.worst, key=lambda r: r.norm)
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

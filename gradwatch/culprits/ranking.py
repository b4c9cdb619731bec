"""Ranking the samples of a kept batch, and the share rule: small pure functions.

No TensorFlow here (the per-sample losses and gradient norms come from
`gradwatch.culprits.per_sample`); `gradwatch.alerts` imports this module, never
the other way round.

The share rule. A sample's *share* of the batch's gradient is its gradient
norm over the sum of every sample's gradient norm (so the shares add up to 1;
a sample whose gradient is not finite has share 1 and is always named). The
*dominant set* is the fewest top-ranked samples whose shares add up to at
least `MOST` (one half). The alert names them when that set is *a few*
samples: at most `FEW` (3), and at most a quarter of the batch (`FEW_FRACTION`)
-- in a batch where every sample pulls equally, half the gradient needs half
the batch, so no one is named and the alert says "no single sample
dominates". Non-finite samples (NaN/Inf loss or gradient) are always named,
first, however many they are (at most `FEW` listed, then a count).
"""

import dataclasses
import math
from typing import List, Optional, Sequence

MOST = 0.5
FEW = 3
FEW_FRACTION = 0.25
# The top-ranked samples of a batch written in its explosion's record.
WRITTEN = 64


@dataclasses.dataclass(frozen=True)
class Culprit:
    """One sample of an exploding step's kept batch.

    Attributes:
        index: its position in the batch (`Explosion.batch()`), from 0.
        loss: its loss on its own (the model's compiled loss on that sample
            alone, its sample weight applied); may be NaN/Inf.
        grad_norm: the L2 norm of the gradient of that loss with respect to the
            model's trainable weights, at the weights the step saw (before its
            update). With Keras' default loss reduction the batch's gradient is
            the mean of these per-sample gradients.
        share: `grad_norm` over the sum of the batch's gradient norms (1.0 for
            a non-finite gradient); see the share rule in this module.
    """

    index: int
    loss: float
    grad_norm: float
    share: float = float("nan")

    @property
    def finite(self):
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)

    def to_json(self):
        return {"index": self.index, "loss": _json_number(self.loss),
                "grad_norm": _json_number(self.grad_norm), "share": _json_number(self.share)}

    @classmethod
    def from_json(cls, doc):
        return cls(int(doc["index"]), _number(doc.get("loss")), _number(doc.get("grad_norm")),
                   _number(doc.get("share")))


def _json_number(value):
    value = float(value)
    return value if math.isfinite(value) else str(value)  # "nan", "inf", "-inf"


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def rank(losses: Sequence[float], grad_norms: Sequence[float], data_size=None) -> List[Culprit]:
    """Every sample as a `Culprit`, sorted by gradient norm, largest first;
    samples with a non-finite loss or gradient norm first, among them those
    whose `data_size` (optional, e.g. the largest absolute value of the
    sample's input and target, inf for NaN/Inf data) is largest, then in batch
    order: where the weights are already NaN every gradient is, and the
    sample holding NaN or huge values is the best lead.

    >>> [(c.index, c.share) for c in rank([0.1, 5.0, 0.2], [1.0, 6.0, 1.0])]
    [(1, 0.75), (0, 0.125), (2, 0.125)]
    >>> [c.index for c in rank([0.1, float("nan"), 0.2], [2.0, float("nan"), 1.0])]
    [1, 0, 2]
    >>> nan = float("nan")
    >>> [c.index for c in rank([nan] * 3, [nan] * 3, data_size=[1.0, 1000.0, nan])]
    [2, 1, 0]
    """
    losses = [float(v) for v in losses]
    norms = [float(v) for v in grad_norms]
    finite_total = sum(n for loss, n in zip(losses, norms) if math.isfinite(loss) and math.isfinite(n))
    culprits = []
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            share = 1.0
        else:
            share = norm / finite_total if finite_total > 0 else 0.0
        culprits.append(Culprit(i, loss, norm, share))
    size = [0.0] * len(culprits) if data_size is None else [
        float(v) if not math.isnan(float(v)) else math.inf for v in data_size]
    return sorted(culprits, key=lambda c: (c.finite, -c.grad_norm if c.finite else -size[c.index], c.index))


def dominant(culprits: Sequence[Culprit]) -> Optional[List[Culprit]]:
    """The samples an alert names (the share rule, module docstring), or None
    when no single sample dominates. `culprits` as `rank` returns them.

    >>> [c.index for c in dominant(rank([9.0, 0.1, 0.1, 0.1], [96.0, 1.0, 2.0, 1.0]))]
    [0]
    >>> dominant(rank([1.0] * 8, [1.0] * 8)) is None
    True
    >>> [c.index for c in dominant(rank([1.0, float("nan")] * 4, [1.0, float("nan")] * 4))]
    [1, 3, 5, 7]
    >>> dominant(rank([float("nan")] * 4, [float("nan")] * 4)) is None  # the weights, not a sample
    True
    """
    bad = [c for c in culprits if not c.finite]
    if bad:
        return bad if len(bad) < len(culprits) or len(culprits) == 1 else None
    size = len(culprits)
    total = 0.0
    chosen = []
    for culprit in culprits:
        if total >= MOST:
            break
        chosen.append(culprit)
        total += culprit.share
    if not chosen or total < MOST or len(chosen) > FEW or len(chosen) > FEW_FRACTION * size:
        return None
    return chosen


def _num(value):
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _median(values):
    values = sorted(values)
    if not values:
        return float("nan")
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def describe(culprits: Sequence[Culprit]) -> str:
    """The culprits' part of an alert line.

    >>> describe(rank([3600.0, 0.8, 0.7, 0.9, 0.8], [96.0, 1.0, 1.0, 1.0, 1.0]))
    'sample 0 of the batch carries 96% of the gradient (loss 3.6e+03 vs a batch median of 0.8)'
    >>> describe(rank([1.0] * 8, [1.0] * 8))
    "no single sample dominates: the whole batch's gradient is large (look at the learning rate or the model, not the data)"
    >>> describe(rank([0.5, float("nan"), 0.2], [1.0, float("nan"), 1.0]))
    'sample 1 of the batch has a NaN/Inf loss or gradient (loss nan)'
    """
    if not culprits:
        return "the kept batch is empty"
    if len(culprits) > 1 and not any(c.finite for c in culprits):
        return ("every sample of the batch has a NaN/Inf loss or gradient "
                "(the weights already were, or the whole batch is bad: not one sample)")
    named = dominant(culprits)
    median = _median([c.loss for c in culprits if math.isfinite(c.loss)])
    if named is None:
        return ("no single sample dominates: the whole batch's gradient is large "
                "(look at the learning rate or the model, not the data)")
    if not named[0].finite:
        shown = named[:FEW]
        more = f" and {len(named) - FEW} more" if len(named) > FEW else ""
        which = ", ".join(str(c.index) for c in shown)
        word = "sample" if len(named) == 1 else "samples"
        losses = ", ".join(_num(c.loss) for c in shown)
        return f"{word} {which}{more} of the batch {'has' if len(named) == 1 else 'have'} a NaN/Inf loss or gradient (loss {losses})"
    share = sum(c.share for c in named)
    which = ", ".join(str(c.index) for c in named)
    word = "sample" if len(named) == 1 else "samples"
    verb = "carries" if len(named) == 1 else "carry"
    losses = ", ".join(_num(c.loss) for c in named)
    return (f"{word} {which} of the batch {verb} {share:.0%} of the gradient "
            f"(loss {losses} vs a batch median of {_num(median)})")


def unpack(data):
    """`(x, y, sample_weight)` of a batch, as `keras.utils.unpack_x_y_sample_weight`.

    >>> unpack(([1], [2]))
    ([1], [2], None)
    >>> unpack({"a": 1})
    ({'a': 1}, None, None)
    """
    if isinstance(data, list):
        data = tuple(data)
    if not isinstance(data, tuple):
        return data, None, None
    if len(data) == 1:
        return data[0], None, None
    if len(data) == 2:
        return data[0], data[1], None
    if len(data) == 3:
        return tuple(data)
    return data, None, None


class BatchNotKeptError(LookupError):
    """`Explosion.batch()` of an explosion whose batch was not kept (the message says why)."""


class KeptRecord:
    """What is known of one explosion's batch on the host (held by `Explosion`).

    `data`: the batch as `train_step` received it (NumPy), or None once dropped
    or never kept; `reason`: why it is not (or no longer) available; `culprits`:
    the ranking, or None.
    """

    def __init__(self, data=None, reason=None, culprits=None):
        self.data, self.reason, self.culprits = data, reason, culprits
        self.previews = None  # {index: preview} written with culprits=True (gradwatch.culprits.store)
        self.arrays_path = None  # the arrays file in the run folder (relative), if written

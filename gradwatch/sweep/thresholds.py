"""Clipping thresholds from the gradient sizes of a probe run. Pure maths (numpy).

Each clipping mode clips a step when one statistic of that step's gradient
passes the threshold, so each mode's thresholds come from the distribution of
its own statistic over the healthy steps of an unclipped probe run:

| mode              | statistic of a step (clipped when above the threshold)  |
| ----------------- | ------------------------------------------------------- |
| `global_clipnorm` | the global L2 norm of the gradient                      |
| `clipnorm`        | the largest L2 norm of one variable's gradient          |
| `clipvalue`       | the largest absolute value of one gradient entry        |

From that statistic's values `LEVELS` picks four thresholds, from "clips every
step hard" to "clips only outliers": a tenth of the median (every step is
clipped to about a tenth of its typical size), the 10th percentile (clips about
90% of the steps), the median (about half) and the 90th percentile (only the
largest 10%). Values are rounded to two significant digits.

Example:

>>> import numpy as np
>>> sizes = np.linspace(1.0, 10.0, 100)
>>> [(t.value, t.rule) for t in propose(sizes)]
[(0.55, 'median / 10'), (1.9, 'p10'), (5.5, 'median'), (9.1, 'p90')]
>>> round(propose(sizes)[1].clipped_fraction, 2)
0.9
"""

import dataclasses
import math

import numpy as np

MODES = ("clipvalue", "clipnorm", "global_clipnorm")

STATISTIC = {
    "global_clipnorm": "global gradient norm",
    "clipnorm": "largest per-variable gradient norm",
    "clipvalue": "largest absolute gradient entry",
}

# (rule name, function of the sorted healthy values). Percentiles are linear
# interpolations (numpy's default).
LEVELS = (
    ("median / 10", lambda values: 0.1 * np.percentile(values, 50)),
    ("p10", lambda values: np.percentile(values, 10)),
    ("median", lambda values: np.percentile(values, 50)),
    ("p90", lambda values: np.percentile(values, 90)),
)
# Fallback when the levels collapse (a nearly constant statistic): the median
# times these factors.
SPREAD = (0.1, 0.3, 1.0, 3.0)
MIN_THRESHOLDS = 3
MIN_STEPS = 10  # healthy probe steps needed to derive thresholds


@dataclasses.dataclass(frozen=True)
class Threshold:
    """One proposed threshold: its value, the rule that chose it, and the
    fraction of the probe's healthy steps it would have clipped."""

    value: float
    rule: str
    clipped_fraction: float


def round_significant(value, digits=2):
    """`value` rounded to `digits` significant digits.

    >>> round_significant(0.012345), round_significant(1234.5)
    (0.012, 1200.0)
    """
    if value == 0 or not math.isfinite(value):
        return float(value)
    exponent = math.floor(math.log10(abs(value)))
    return float(round(value, digits - 1 - exponent))


def propose(values):
    """Thresholds (ascending, distinct, at least `MIN_THRESHOLDS`) for one
    mode from its statistic's values over healthy probe steps.

    Raises `ValueError` when fewer than `MIN_STEPS` finite values are given or
    their median is not positive (no gradient to size a threshold on).
    """
    values = np.asarray(values, dtype=np.float64)
    values = np.sort(values[np.isfinite(values)])
    if values.size < MIN_STEPS:
        raise ValueError(f"{values.size} healthy probe steps; at least {MIN_STEPS} are needed.")
    median = float(np.percentile(values, 50))
    if not median > 0:
        raise ValueError("the probe's gradients are zero: no scale to derive thresholds from.")
    candidates = [(round_significant(float(rule(values))), name) for name, rule in LEVELS]
    if len({value for value, _ in candidates if value > 0}) < MIN_THRESHOLDS:
        candidates = [(round_significant(factor * median), f"median x {factor:g}")
                      for factor in SPREAD]
    chosen = {}
    for value, name in candidates:
        if value > 0 and value not in chosen:
            chosen[value] = name
    return [Threshold(value, name, float(np.mean(values > value)))
            for value, name in sorted(chosen.items())]


def step_statistics(variable_sq_norms, variable_max_abs):
    """Per-step statistics of each mode from per-variable measurements.

    Args:
        variable_sq_norms: `[steps, variables]` squared L2 norms.
        variable_max_abs: `[steps, variables]` largest absolute entries.

    Returns:
        `{mode: [steps] array}` (see the table in the module docstring).

    >>> stats = step_statistics(np.array([[9.0, 16.0]]), np.array([[2.0, 3.0]]))
    >>> {mode: float(v[0]) for mode, v in sorted(stats.items())}
    {'clipnorm': 4.0, 'clipvalue': 3.0, 'global_clipnorm': 5.0}
    """
    sq = np.asarray(variable_sq_norms, dtype=np.float64)
    max_abs = np.asarray(variable_max_abs, dtype=np.float64)
    return {
        "global_clipnorm": np.sqrt(sq.sum(axis=1)),
        "clipnorm": np.sqrt(sq.max(axis=1)),
        "clipvalue": max_abs.max(axis=1),
    }


def describe(mode, threshold, steps):
    """One line saying why `threshold` was chosen for `mode`.

    >>> describe("clipnorm", Threshold(0.3, "p10", 0.9), 200)
    'clipnorm=0.3: p10 of the largest per-variable gradient norm over 200 healthy probe steps (would clip 90% of them)'
    """
    return (f"{mode}={threshold.value:g}: {threshold.rule} of the {STATISTIC[mode]} over {steps} "
            f"healthy probe steps (would clip {threshold.clipped_fraction:.0%} of them)")

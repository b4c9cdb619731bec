"""Pure vanishing- and dead-gradient detection over recorded per-layer norms.

Runs on the host, on the per-layer gradient norms the train step already
records (no op is added to the step). State in, new state out (optax style);
numpy arrays over layers, layers in model order (the last ones nearest the
loss).

**Vanishing.** A layer's size-free gradient scale is its per-parameter RMS,
`norm / sqrt(parameters)`. At each step, its *depth gap* is
`log10(rms) - mean(log10(rms) of the layers after it)`: how many orders of
magnitude the layer sits below the layers nearer the loss (their geometric
mean). A layer vanishes when its gap is at most `-orders` for `window`
consecutive steps at which it had a gradient (times 2**k after k earlier
onsets: a layer that keeps crossing the bound alerts less and less often); it
recovers after `window` consecutive steps above. Layers whose gradient is sparse (`tf.IndexedSlices`:
embeddings, whose untouched rows dilute the RMS) are neither judged nor used as
a reference. Steps where a layer's gradient is zero, NaN/Inf, or a row is not a
step (loss-scale overflow), change nothing for it.

**Dead.** A layer dies when, after having had a gradient, its norm is zero --
or below float32 resolution, `DEAD_RESOLUTION` (2**-24) times its typical norm
(an EMA of log10 of its non-zero norms) -- for `dead_steps` consecutive steps,
and for long enough that a layer as often off as this one was before (a
fraction `p` of its steps since its first gradient, estimated as
`(zero steps + 1) / (steps + 2)`) would be off that long by chance at most
`dead_chance` of the time: `p ** run <= dead_chance`. A layer that is
legitimately off on some steps (a rarely used head or expert, a gate) so needs a
longer silence: at `p = 0.9`, 132 steps. It recovers at its first non-zero
step; after k earlier deaths it needs `dead_steps * 2**k` zero steps (and its
zero steps raised its `p`), so a layer that keeps going off and on alerts less
and less often. A layer that never had a gradient (frozen,
disconnected) is never flagged.

The defaults come from `benchmarks/false_alarms.py --vanishing`; see
`VanishingConfig`.

Example:

>>> import numpy as np
>>> config = VanishingConfig(window=3, dead_steps=2)
>>> state = init(3)
>>> norms = np.array([[1e-6, 1.0, 1.0]] * 4)
>>> state, events = scan(state, norms, sizes=[1, 1, 1], sparse=[False] * 3, config=config)
>>> [(e.row, e.kind, e.onset, e.layers) for e in events]
[(2, 'vanishing', True, (0,))]
"""

import dataclasses
import math
from typing import NamedTuple, Tuple

import numpy as np

VANISHING, DEAD = "vanishing", "dead"
KINDS = (VANISHING, DEAD)
# float32's relative resolution: a norm this many times below a layer's typical
# norm no longer moves its weights.
DEAD_RESOLUTION = 2.0 ** -24
_TYPICAL_DECAY = 0.95  # EMA of a layer's log10 norm (time constant 20 steps)


@dataclasses.dataclass(frozen=True)
class VanishingConfig:
    """Settings of the vanishing / dead detector.

    Attributes:
        orders: a layer vanishes when its per-parameter gradient RMS is at
            least this many orders of magnitude (powers of 10) below the
            geometric mean of the layers after it.
        window: ... for this many consecutive steps (with a gradient); the
            same number of steps above clears it.
        dead_steps: a layer with a gradient before is dead after this many
            consecutive zero-gradient steps ...
        dead_chance: ... and once a zero run this long would happen by
            chance at most this often, given how often the layer was off.
    """

    orders: float = 3.0
    window: int = 50
    dead_steps: int = 50
    dead_chance: float = 1e-6

    def __post_init__(self):
        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        checks = (("orders", number(self.orders) and self.orders > 0, "a positive number"),
                  ("window", positive_int(self.window), "a positive integer"),
                  ("dead_steps", positive_int(self.dead_steps), "a positive integer"),
                  ("dead_chance", number(self.dead_chance) and 0 < self.dead_chance < 1, "a number in (0, 1)"))
        for name, valid, requirement in checks:
            if not valid:
                raise ValueError(f"`{name}` must be {requirement}. Received: {name}={getattr(self, name)!r}")


class VanishingState(NamedTuple):
    """Per-layer arrays (length = number of layers)."""

    below: np.ndarray  # int64: consecutive gradient steps at least `orders` below
    above: np.ndarray  # int64: consecutive gradient steps above (while vanishing)
    vanishing: np.ndarray  # bool: flagged vanishing
    seen: np.ndarray  # int64: non-zero steps seen (0: never had a gradient)
    typical: np.ndarray  # float64: EMA of log10 of the non-zero norms
    zero_run: np.ndarray  # int64: consecutive zero steps now
    zero_steps: np.ndarray  # int64: zero steps in the zero runs that ended
    dead: np.ndarray  # bool: flagged dead
    vanishing_onsets: np.ndarray  # int64: times flagged vanishing so far
    dead_onsets: np.ndarray  # int64: times flagged dead so far


class Event(NamedTuple):
    """A change at row `row` of a `scan`: `kind` starts (`onset`) or ends for `layers`.

    `values`, per layer: the depth gap at that row (vanishing) or the zero
    steps in a row (dead)."""

    row: int
    kind: str
    onset: bool
    layers: Tuple[int, ...]
    values: Tuple[float, ...] = ()


def init(num_layers):
    """The state before any step."""
    zeros = np.zeros(num_layers, np.int64)
    return VanishingState(below=zeros, above=zeros, vanishing=np.zeros(num_layers, bool), seen=zeros,
                          typical=np.zeros(num_layers), zero_run=zeros, zero_steps=zeros,
                          dead=np.zeros(num_layers, bool), vanishing_onsets=zeros, dead_onsets=zeros)


def depth_gaps(norms, sizes, usable):
    """`[steps, layers]` depth gaps (orders of magnitude, NaN where not defined).

    `norms`: `[steps, layers]`; `sizes`: parameters per layer; `usable`:
    `[steps, layers]` bool, the cells that count (as a gap and as a reference).
    """
    norms = np.asarray(norms, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_rms = np.log10(norms) - 0.5 * np.log10(np.asarray(sizes, np.float64))
    values = np.where(usable, log_rms, 0.0)
    # Sums over the layers after each one: reversed cumulative sums, shifted by one.
    after_sum = np.cumsum(values[:, ::-1], axis=1)[:, ::-1] - values
    after_count = np.cumsum(usable[:, ::-1], axis=1)[:, ::-1] - usable
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = log_rms - after_sum / after_count
    return np.where(usable & (after_count > 0), gaps, np.nan)


def scan(state, norms, sizes, sparse, config, steps_ok=None):
    """Runs the detector over `norms` (`[steps, layers]`, in step order).

    Args:
        state: a `VanishingState` (from `init` or the previous call).
        norms: per-layer gradient L2 norms.
        sizes: parameters per layer (trainable variables' sizes summed).
        sparse: per layer, whether its gradient is sparse (not judged for vanishing).
        config: a `VanishingConfig`.
        steps_ok: `[steps]` bool, False for rows that are not steps (a
            loss-scale overflow); default all True.

    Returns:
        `(new state, [Event])`, events in row order.
    """
    norms = np.asarray(norms, np.float64)
    if norms.ndim != 2 or norms.shape[1] != len(state.seen):
        raise ValueError(f"`norms` must be [steps, {len(state.seen)}]. Received shape {norms.shape}")
    steps_ok = np.ones(len(norms), bool) if steps_ok is None else np.asarray(steps_ok, bool)
    finite = np.isfinite(norms) & steps_ok[:, None]
    judged = ~np.asarray(sparse, bool)
    s = state._replace(**{k: v.copy() for k, v in state._asdict().items()})
    events = []
    gaps = None
    for row in range(len(norms)):
        norm, ok = norms[row], finite[row]
        with np.errstate(divide="ignore"):
            log_norm = np.log10(np.where(ok, norm, 1.0))
        zero = ok & (s.seen > 0) & ((norm <= 0) | (log_norm < s.typical + math.log10(DEAD_RESOLUTION)))
        nonzero = ok & (norm > 0) & ~zero
        # -- dead --
        ended = nonzero & (s.zero_run > 0)
        s.zero_steps[ended] += s.zero_run[ended]
        s.zero_run[ended] = 0
        s.zero_run[zero] += 1
        recovered = s.dead & nonzero
        s.dead[recovered] = False
        died = zero & ~s.dead & (s.zero_run >= required_zero_run(s.zero_steps, s.seen, config, s.dead_onsets))
        s.dead[died] = True
        s.dead_onsets[died] += 1
        weight = np.maximum(1.0 / (s.seen + 1), 1.0 - _TYPICAL_DECAY)
        s.typical[nonzero] += weight[nonzero] * (log_norm[nonzero] - s.typical[nonzero])
        s.seen[nonzero] += 1
        _note(events, row, DEAD, died, recovered, s.zero_run)
        # -- vanishing -- (gaps of the whole batch at once, the first time needed)
        usable = nonzero & judged
        if not usable.any():
            continue
        if gaps is None:
            ok_all = finite & (norms > 0) & judged
            gaps = depth_gaps(norms, sizes, ok_all)
        gap = gaps[row]
        counted = usable & ~np.isnan(gap)
        below = counted & (gap <= -config.orders)
        above = counted & ~below
        s.below[below] += 1
        s.below[above] = 0
        s.above[above] += 1
        s.above[below] = 0
        onset = ~s.vanishing & (s.below >= config.window * _backoff(s.vanishing_onsets))
        cleared = s.vanishing & (s.above >= config.window)
        s.vanishing[onset] = True
        s.vanishing_onsets[onset] += 1
        s.vanishing[cleared] = False
        _note(events, row, VANISHING, onset, cleared, gap)
    return s, events


def required_zero_run(zero_steps, nonzero_steps, config, onsets=0):
    """Zero steps in a row that make a layer dead, given its history (arrays):
    zero and non-zero steps so far, and how often it was flagged dead before."""
    off = (np.asarray(zero_steps) + 1.0) / (np.asarray(zero_steps) + np.asarray(nonzero_steps) + 2.0)
    by_chance = np.ceil(math.log(config.dead_chance) / np.log(off))
    return np.maximum(config.dead_steps * _backoff(onsets), by_chance)


def _backoff(onsets):
    """2**onsets (capped): the persistence asked of a layer flagged `onsets` times before."""
    return 2.0 ** np.minimum(np.asarray(onsets), 40)


def _note(events, row, kind, onset, cleared, values):
    for changed, is_onset in ((onset, True), (cleared, False)):
        if changed.any():
            layers = np.flatnonzero(changed)
            events.append(Event(row, kind, is_onset, tuple(layers.tolist()), tuple(values[layers].tolist())))


def layer_sizes(variables, layer_of_variable, num_layers):
    """Parameters per layer: sizes of `variables` summed by `layer_of_variable[id(v)]`."""
    sizes = np.zeros(num_layers, np.int64)
    for variable in variables:
        index = layer_of_variable.get(id(variable))
        if index is not None and index < num_layers:
            sizes[index] += int(np.prod(variable.shape))
    return np.maximum(sizes, 1)

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
recovers after `window` consecutive steps above. Layers whose gradient is
sparse (`tf.IndexedSlices`: embeddings, whose untouched rows dilute the RMS)
are neither judged nor used as a reference. Steps where a layer's gradient is
exactly zero or NaN/Inf, and rows that are not steps (loss-scale overflow),
change nothing for it.

**Dead.** A layer's gradient is *zero* at a step when its norm is 0 or below
float32 resolution of that step's gradient: `DEAD_RESOLUTION` (2**-24) times
the global norm. A layer dies when, after a non-zero step, it is zero for
`dead_steps` consecutive steps, and for long enough that a layer as often off
as this one was before (a fraction `p` of its steps since its first gradient,
estimated as `(zero steps + 1) / (steps + 2)`) would be off that long by chance
at most `dead_chance` of the time: `p ** run <= dead_chance`. A layer that is
legitimately off on some steps (a rarely used head or expert, a gate) so needs
a longer silence: at `p = 0.9`, 132 steps. It recovers at its first non-zero
step; after k earlier deaths it needs `dead_steps * 2**k` zero steps, so a
layer that keeps going off and on alerts less and less often.

A layer flagged vanishing is not flagged dead as well (and the other way round)
until it recovers; when both rules fire at one step, vanishing is reported. A
layer that never had a gradient (frozen, disconnected) is never flagged.

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
# float32's relative resolution: a layer norm this many times below the step's
# global norm adds nothing float32 can represent.
DEAD_RESOLUTION = 2.0 ** -24


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

    Defaults, from `benchmarks/false_alarms.py --vanishing` (60 healthy runs:
    deep ReLU/GELU MLPs with and without normalisation, residual blocks,
    frozen layers, a 20k-word embedding, a transformer, LSTMs, a GRU, a CNN, a
    head trained on 10% of the batches): 0 alarms, the lowest depth gap held
    for 50 steps -1.67, the longest silence 0.70 of the one required; every
    constructed case caught (deep sigmoid MLP, a branch gated off, dying
    ReLUs after a learning-rate jump).
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
    above: np.ndarray  # int64: consecutive gradient steps above
    vanishing: np.ndarray  # bool: flagged vanishing
    seen: np.ndarray  # int64: non-zero steps seen (0: never had a gradient)
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
    zeros, false = np.zeros(num_layers, np.int64), np.zeros(num_layers, bool)
    return VanishingState(below=zeros, above=zeros, vanishing=false, seen=zeros, zero_run=zeros,
                          zero_steps=zeros, dead=false, vanishing_onsets=zeros, dead_onsets=zeros)


def depth_gaps(norms, sizes, usable):
    """`[steps, layers]` depth gaps (orders of magnitude, NaN where not defined).

    `norms`: `[steps, layers]`; `sizes`: parameters per layer; `usable`:
    `[steps, layers]` bool, the cells that count (as a gap and as a reference).
    """
    norms = np.asarray(norms, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_rms = np.log10(norms) - 0.5 * np.log10(np.asarray(sizes, np.float64))
    values = np.where(usable, log_rms, 0.0)
    # Sums over the layers after each one: reversed cumulative sums, minus the layer itself.
    after_sum = np.cumsum(values[:, ::-1], axis=1)[:, ::-1] - values
    after_count = np.cumsum(usable[:, ::-1], axis=1)[:, ::-1] - usable
    with np.errstate(divide="ignore", invalid="ignore"):
        gaps = log_rms - after_sum / after_count
    return np.where(usable & (after_count > 0), gaps, np.nan)


class _Cells(NamedTuple):
    """`[steps, layers]` masks of one scan (cells of rows that are steps, finite)."""

    live: np.ndarray  # a non-zero gradient
    quiet: np.ndarray  # a zero gradient (or below float32 resolution of the step's)
    below: np.ndarray  # judged for vanishing, at least `orders` below
    above: np.ndarray  # judged for vanishing, not below
    gaps: np.ndarray


def _cells(norms, sizes, sparse, config, steps_ok):
    ok = np.isfinite(norms) & steps_ok[:, None]
    finite = np.where(ok, norms, 0.0)
    scale = np.sqrt(np.sum(finite * finite, axis=1, keepdims=True))  # the step's global norm
    live = ok & (norms > 0) & (norms > DEAD_RESOLUTION * scale)
    judged = ok & (norms > 0) & ~np.asarray(sparse, bool)[None, :]
    gaps = depth_gaps(norms, sizes, judged)
    counted = judged & ~np.isnan(gaps)
    below = counted & (gaps <= -config.orders)
    return _Cells(live=live, quiet=ok & ~live, below=below, above=counted & ~below, gaps=gaps)


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
        `(new state, [Event])`, events in row order. Scanning a sequence in
        pieces gives the same events as at once.
    """
    norms = np.asarray(norms, np.float64)
    if norms.ndim != 2 or norms.shape[1] != len(state.seen):
        raise ValueError(f"`norms` must be [steps, {len(state.seen)}]. Received shape {norms.shape}")
    steps_ok = np.ones(len(norms), bool) if steps_ok is None else np.asarray(steps_ok, bool)
    cells = _cells(norms, sizes, sparse, config, steps_ok)
    quick = _without_changes(state, cells, config)
    if quick is not None:
        return quick, []
    return _row_by_row(state, cells, config)


def _without_changes(state, cells, config):
    """The state after `cells` computed at once, or None if some layer may change flag."""
    index = np.arange(len(cells.live))[:, None]
    alive = (state.seen > 0) | (np.cumsum(cells.live, axis=0) - cells.live > 0)
    zero = cells.quiet & alive
    live_count, zero_count = cells.live.sum(0), zero.sum(0)
    below_count, above_count = cells.below.sum(0), cells.above.sum(0)
    if ((state.dead & (live_count > 0))
            | (~state.dead & (state.zero_run + zero_count >= config.dead_steps * _backoff(state.dead_onsets)))
            | (~state.vanishing & (state.below + below_count >= config.window * _backoff(state.vanishing_onsets)))
            | (state.vanishing & (state.above + above_count >= config.window))).any():
        return None

    def run_at_end(hits, breaks, carried, count):
        last_break = np.where(breaks, index, -1).max(0)
        return np.where(last_break >= 0, (hits & (index > last_break)).sum(0), carried + count)

    zero_run = run_at_end(zero, cells.live, state.zero_run, zero_count)
    return state._replace(
        below=run_at_end(cells.below, cells.above, state.below, below_count),
        above=run_at_end(cells.above, cells.below, state.above, above_count),
        seen=state.seen + live_count, zero_run=zero_run,
        zero_steps=state.zero_steps + state.zero_run + zero_count - zero_run)


def _row_by_row(state, cells, config):
    s = state._replace(**{k: v.copy() for k, v in state._asdict().items()})
    events = []
    for row in range(len(cells.live)):  # vanishing first: of both at once, vanishing is reported
        below, above = cells.below[row], cells.above[row]
        s.below[below] += 1
        s.below[above] = 0
        s.above[above] += 1
        s.above[below] = 0
        counted = below | above  # flags change only at steps where the layer is judged
        onset = counted & ~s.vanishing & ~s.dead & (s.below >= config.window * _backoff(s.vanishing_onsets))
        cleared = counted & s.vanishing & (s.above >= config.window)
        s.vanishing[onset] = True
        s.vanishing_onsets[onset] += 1
        s.vanishing[cleared] = False
        _note(events, row, VANISHING, onset, cleared, cells.gaps[row])
        live = cells.live[row]
        zero = cells.quiet[row] & (s.seen > 0)
        ended = live & (s.zero_run > 0)
        s.zero_steps[ended] += s.zero_run[ended]
        s.zero_run[ended] = 0
        s.zero_run[zero] += 1
        recovered = s.dead & live
        s.dead[recovered] = False
        died = zero & ~s.dead & ~s.vanishing & (
            s.zero_run >= required_zero_run(s.zero_steps, s.seen, config, s.dead_onsets))
        s.dead[died] = True
        s.dead_onsets[died] += 1
        s.seen[live] += 1
        _note(events, row, DEAD, died, recovered, s.zero_run)
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

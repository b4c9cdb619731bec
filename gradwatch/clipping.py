"""The in-graph clipping rule and the "auto" clipping threshold. Pure maths.

Formulas follow Keras' own (`clipnorm`: `g * t / max(||g||, t)` per variable,
with TensorFlow's `tf.clip_by_norm` as Keras calls it; `global_clipnorm`: the
same on the global norm, Pascanu et al. 2013; `clipvalue`: each entry into
`[-t, t]`), so clipping through gradwatch gives the update Keras would give, bit
for bit on one device -- but on the all-reduced gradient.

Example:

>>> import tensorflow as tf
>>> g = [tf.constant([3.0, 4.0])]
>>> clipped = clip_gradients(g, "global_clipnorm", 1.0, tf.constant(True))
>>> [round(float(x), 3) for x in clipped[0]]
[0.6, 0.8]
"""

import dataclasses

import tensorflow as tf

MODES = ("clipnorm", "global_clipnorm", "clipvalue")


@dataclasses.dataclass(frozen=True)
class AutoThreshold:
    """How `clip_threshold="auto"` sets the clipping threshold (AutoClip,
    Seetharaman et al. 2020, over a window and per variable), from healthy
    statistics only.

    The rule, in a few sentences. Every healthy step (not exploded, finite)
    adds its statistic to a window of the last `window` values: each
    variable's gradient norm for `clipnorm` (one threshold per variable), the
    global norm for `global_clipnorm`, the root-mean-square gradient entry for
    `clipvalue`. At the switch (the first explosion), the threshold is the
    `percentile`-th percentile of that window: the *baseline*, taken from the
    steps before the trouble; a run that explodes from its first steps gets
    it from the lowest of its first norms. From then on it follows the window,
    which can take it down with the run but never above `rise` times the
    baseline: steps that explode never enter the window, and the others enter
    at most at `rise` times the baseline, so a divergence cannot ratchet it up.
    Last, while clipping is on, a step that still explodes with a norm at
    least `1 / shrink` (2) times that of the switch, or of the last such step,
    shrinks the threshold in proportion (a norm 8x the reference: 1/8, at
    least halved, never below `min_scale` of the window's value): a run whose
    norms keep growing although clipped -- momentum carrying a spike, a
    divergence -- is clipped harder, until its norms stop doubling (and with
    `GradientMonitor(reset_momentum=True)`, the default, the optimizer's
    momentum is zeroed at that step too, as at the switch: it is what carries
    a clipped run on after a learning-rate spike). Optionally (`elevation`,
    off by default), while the run's typical norm (the detector's median over
    its recent healthy steps) stays at least `elevation` times what it was at
    the switch, the threshold halves every `recover_steps` steps. Every other
    finite step lets it come back up, doubling over `recover_steps` steps, so
    a run that settled at a higher norm is not left frozen under a tiny
    threshold.

    The overshoot watch, last, catches a run whose every step is too long
    although its norms do not grow -- a divergence from step 1, clipped at
    a threshold taken from its first, already too large, norms. While
    clipping is on, each step measures the cosine between its gradient and
    the update the optimizer just made: positive means the previous step went
    past the point where the loss stopped falling along its direction (the
    sign of the hypergradient of the step size, Baydin et al. 2018). Its
    running average over about `overshoot_steps` steps, minus
    `overshoot_level`, times `overshoot_gain`, is subtracted from the log of
    the threshold's factor at every step, which never rises above 1: a run
    whose updates keep overshooting is clipped harder and harder, and one
    whose steps are short enough (the average below the level) comes back.
    The same watch measures how far each update moved the weights, as a
    fraction of their norm: a healthy step moves them by about 0.1% (the
    classic rule of thumb; 0.1-3% on this project's healthy runs), the first
    steps of a run diverging from step 1 by 10-70%. While an update moves
    them by more than `update_ratio` (1%) and not less than the update
    before, a second factor on the threshold is multiplied by `(update_ratio
    / ratio) ** update_gain` at each step, and while they move them by less
    than 1% it comes back the same way (never above 1): a divergence whose
    gradients point nowhere in particular (no overshoot to read in the
    cosine) is still clipped down to steps of a sane size, and a
    learning-rate spike's shrinking is undone once the spike is over. The
    two factors multiply (at least `min_scale`). And while the updates keep
    overshooting (the running cosine above `overshoot_level`) and still
    move the weights by more than twice `update_ratio`, the momentum is what
    carries the run uphill -- the clipped gradient is too small to turn it
    around -- so with `GradientMonitor(reset_momentum=True)` the momentum is
    zeroed at each such step (`carried_uphill`).

    The restart, last: a run in trouble from its start has no healthy steps
    to take a threshold from, and its first, too long, steps have already
    thrown the weights far from where they started before anything could call
    them an explosion (a tanh MLP diverging from step 1 moved them by 7-37% a
    step). So when clipping switches on before the detector has seen
    `restart_steps` healthy steps, the weights go back to those the run had
    before its first step (kept then: the watch's copy, unused until the
    switch) and the run goes on from there, clipped, with the momentum zeroed
    (`reset_momentum`). The distance it had moved since counts as the update
    the size factor measures, so the threshold starts as low as those steps
    were long. The switch is logged and recorded as a restart.

    The first steps judged again: trouble in the very first steps (a
    corrupted batch at step 1, inputs that blow up an untrained net) can stay
    below the warm-up's threshold, which only compares each step with the few
    before it, all of them too large; the run then trains on from wherever
    they threw it. So at the one step where the detector's window first holds
    `window` healthy steps (step 33 by default, if none exploded), its first
    `restart_steps` steps are judged again: one at least `rejudge_ratio`
    times the window's median switches clipping on at that step, with a
    restart from the weights before the first step (`restart_steps` steps
    were too few to tell; 32 are enough). The distance moved in those 32
    steps is not taken as one too-long update: the size factor starts at 1.
    (With a `rollback_steps` shorter than the window, the weights kept may
    already be a later quiet step's: the run goes back to those.) The ratio
    is twice the detector's largest factor, because healthy runs start high
    too: a regression's first norms were up to 10x its later ones on this
    project's healthy runs while the loss fell, the corrupted starts 40-200x.

    The rollback: trouble that builds up over a few steps mid-run (a
    learning-rate spike: norms x3-x6 a step, each still under the detector's
    threshold) does its harm before the step that crosses it, whose own
    update is then clipped too late to matter. So, past those first
    `restart_steps`, the kept weights are refreshed at the first quiet step
    (its norm under `rollback_level` times the detector's threshold)
    `rollback_steps` steps or more after they were last kept, and a switch
    whose previous healthy step was already loud (at least `rollback_level`
    times the threshold) takes the run back to them, as a restart does:
    recorded with the step they were kept at. A switch out of the blue (one
    corrupted batch after quiet steps) has nothing to undo and does not roll
    back. Both the restart and the rollback leave the learning rate schedule,
    the optimizer's step count and non-trainable weights (BatchNormalization's
    statistics) where they are.

    Why these defaults: `benchmarks/auto_threshold.py` (kinds of trouble x
    model families x optimizers x seeds, each against 4 fixed thresholds from
    the start; tables in `benchmarks/README.md`). Once a run has exploded, a
    threshold below the typical norm -- most steps clipped, the bad ones no
    larger than ordinary ones -- trains best (issue 13: the 25th percentile
    per variable, worst 1.23x of the best fixed `clipnorm` on rare corrupted
    targets; the 90th percentile frozen at the switch, 17.8x). The overshoot
    watch's (gain 1, 16 steps, level 0.1) were picked among 8 settings on
    seeds 0, 2, 3 of the divergence kind and on the adding problem; on seed 4,
    held out, the tanh MLP diverging from step 1 went from 19.9x / 197x the
    best fixed threshold without it to 1.65x / 2.75x with it (`clipnorm` /
    `global_clipnorm`). The updates' size (`update_ratio` 1%, gain 0.5): 1% is
    ten times the classic healthy step (0.1%) and above the median step of
    this project's healthy runs (0.2-0.3%), below the first steps of every
    run diverging from step 1 measured (5-70%); with gain 1 the factor
    over-shrank (a CNN diverging from step 1: 9-86x the best fixed threshold).
    The restart (`restart_steps` 16, half the detector's warm-up): on the
    runs diverging from step 1 of seeds 0-4, 14/16 (`clipnorm`) and 15/15
    (`global_clipnorm`) within 1.5x of the best fixed threshold, against 9
    and 6 without it. The rollback (`rollback_steps` 32, the detector's
    window; `rollback_level` 0.3, about 3x the typical norm in the warm-up;
    both set before any run, not tuned): the learning-rate spikes of the
    held-out seeds 5-9, 20/20 per mode within 1.5x (18/20 and 17/20 without
    it, worst 4.63x); no rolled-back run ended worse than 1.06x.

    Attributes:
        percentile: the percentile of the window (nearest rank), in (0, 100].
        window: how many recent healthy values the percentile looks at.
        per_variable: `clipnorm` only: one threshold per variable, from that
            variable's own norms; else one threshold from all variables' norms.
        follow: update the threshold every step after the switch; False
            freezes it at the baseline (the shrinking still applies).
        rise: the threshold never exceeds `rise` times the baseline (>= 1).
        shrink: the factor applied at each clipped step that keeps growing,
            in (0, 1]; 1 turns the shrinking off.
        min_scale: the smallest factor each shrinking rule (growth, overshoot)
            can reach, in (0, 1].
        recover_steps: non-exploding steps over which a shrunk threshold
            doubles back (a positive integer).
        elevation: while clipping is on and the run's typical norm (the
            detector's median) stays at least this many times what it was at
            the switch, the threshold keeps shrinking, halving every
            `recover_steps` steps (>= 1). Default `inf`: off. Measured with 4
            (`benchmarks/README.md`): a self-attention block diverging from
            step 1 went from 4.3x to 1.5x the best fixed `global_clipnorm`,
            but the adding problem's RNN, whose norms rise as it learns after
            the switch, ended 1.2-2.7x worse on 4 seeds of 5.
        overshoot_gain: how fast the overshoot watch moves the threshold
            (`overshoot_update`): its factor changes by `exp(-gain * (average
            - level))` per step (>= 0; 0 leaves the cosine out). The watch
            keeps one float32 copy of the trainable weights (allocated with
            the monitor's state, written only while clipping is on).
        overshoot_steps: the span of the watch's running average of cosines
            (a positive integer).
        overshoot_level: the average cosine at which the threshold holds:
            above it, it shrinks; below, it comes back (in [-1, 1)).
        update_ratio: the fraction of the weights' norm an update may move
            them by while clipping is on before the threshold shrinks for it
            (in (0, 1)).
        update_gain: how fast the updates' size moves its factor
            (`update_size_update`; >= 0; 0 leaves the update's size out).
            `overshoot_gain=0, update_gain=0` turns the whole watch off, and
            its copy of the weights with it (unless `restart_steps` keeps it).
        restart_steps: a switch before the detector has seen this many
            healthy steps restarts the run from the weights before its first
            step (a non-negative integer; 0 turns the restart off). Needs the
            adaptive detector (no fixed `explosion_threshold`), as the
            rollback does.
        rollback_steps: after `restart_steps`, the weights are kept again
            (at a quiet step) this many steps or more after the last time,
            for a rollback (a non-negative integer; 0 turns the rollback
            off). A rollback loses the steps since: up to this many, a few
            more where no step was quiet at the time.
        rollback_level: a step is quiet below this fraction of the
            detector's threshold, loud at or above it (in (0, 1]).
        rejudge_ratio: once the detector's window is first full, a norm of
            one of the first `restart_steps` steps at least this many times
            the window's median switches clipping on with a restart (> 1;
            `inf` turns this off; so does `restart_steps=0`).
    """

    percentile: float = 25.0
    window: int = 256
    per_variable: bool = True
    follow: bool = True
    rise: float = 1.0
    shrink: float = 0.5
    min_scale: float = 1.0 / 64.0
    recover_steps: int = 16
    elevation: float = float("inf")
    overshoot_gain: float = 1.0
    overshoot_steps: int = 16
    overshoot_level: float = 0.1
    update_ratio: float = 0.01
    update_gain: float = 0.5
    restart_steps: int = 16
    rollback_steps: int = 32
    rollback_level: float = 0.3
    rejudge_ratio: float = 20.0

    @property
    def watches_overshoot(self):
        return self.overshoot_gain > 0 or self.update_gain > 0

    @property
    def keeps_weights(self):
        """The monitor keeps a copy of the trainable weights (the overshoot
        watch's last step, or a quiet step's for a restart or a rollback)."""
        return self.watches_overshoot or self.goes_back

    @property
    def rejudges_start(self):
        """The first steps are judged again once the detector's window is full."""
        return self.restart_steps > 0 and self.rejudge_ratio != float("inf")

    @property
    def goes_back(self):
        """A switch may take the run back to kept weights (a restart or a rollback)."""
        return self.restart_steps > 0 or self.rollback_steps > 0

    def __post_init__(self):
        q, window = self.percentile, self.window
        if not (isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 100):
            raise ValueError(f"`percentile` must be a number in (0, 100]. Received: percentile={q!r}")
        for name in ("window", "recover_steps", "overshoot_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
        for name in ("restart_steps", "rollback_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"`{name}` must be a non-negative integer. Received: {name}={value!r}")
        inf = float("inf")
        for name, low, high, bounds in (("rise", 1.0, inf, "[1, inf)"), ("shrink", 0.0, 1.0, "(0, 1]"),
                                        ("min_scale", 0.0, 1.0, "(0, 1]"), ("elevation", 1.0, inf, "[1, inf)"),
                                        ("rollback_level", 0.0, 1.0, "(0, 1]"),
                                        ("rejudge_ratio", 1.0, inf, "(1, inf]"),
                                        ("overshoot_gain", 0.0, inf, "[0, inf)"),
                                        ("update_ratio", 0.0, 1.0, "(0, 1)"), ("update_gain", 0.0, inf, "[0, inf)")):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            above_low = number and (low <= value if bounds.startswith("[") else low < value)
            below_high = number and (value <= high if bounds.endswith("]") or high == inf else value < high)
            if not (above_low and below_high):
                raise ValueError(f"`{name}` must be a number in {bounds}. Received: {name}={value!r}")
        value = self.overshoot_level
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and -1.0 <= value < 1.0):
            raise ValueError(f"`overshoot_level` must be a number in [-1, 1). Received: overshoot_level={value!r}")


def grew(norm, reference, auto):
    """Whether `norm` is `1 / auto.shrink` times `reference` or more (NaN: no).

    >>> [bool(grew(n, 10.0, AutoThreshold())) for n in [19.0, 20.0, float("nan")]]
    [False, True, False]
    """
    return tf.cast(norm, tf.float32) * auto.shrink >= tf.cast(reference, tf.float32)


def auto_scale(scale, keeps_growing, finite, auto, factor=None, elevated=False):
    """The shrinking factor after a step (float32 scalars, branch-free).

    Multiplied by `factor` (at most `auto.shrink`; default `auto.shrink`;
    never below `auto.min_scale`) when the step `keeps_growing` (clipping was
    already on, and the step still explodes with a norm that `grew`); else, on
    a `finite` step that is `elevated` (the run's typical norm still far
    above the one at the switch: clipped at the healthy scale, the run did not
    come back to it), multiplied by `shrink ** (1 / recover_steps)`: halved
    every `recover_steps` steps while it stays so; on any other finite step
    divided by that (at most 1): back to 1 within `recover_steps` steps per
    halving once the run is back.

    >>> auto = AutoThreshold(recover_steps=1)
    >>> [float(auto_scale(1.0, True, True, auto)), float(auto_scale(0.25, False, True, auto))]
    [0.5, 0.5]
    >>> float(auto_scale(0.25, False, False, auto))  # a NaN step: held
    0.25
    >>> float(auto_scale(0.25, False, True, auto, elevated=True))  # still far above the healthy scale
    0.125
    """
    scale = tf.cast(scale, tf.float32)
    factor = auto.shrink if factor is None else tf.minimum(tf.cast(factor, tf.float32), auto.shrink)
    shrunk = tf.maximum(scale * factor, auto.min_scale)
    step = auto.shrink ** (1.0 / auto.recover_steps)
    recovered = tf.where(tf.cast(elevated, tf.bool), tf.maximum(scale * step, auto.min_scale),
                         tf.minimum(scale / step, 1.0))
    return tf.where(tf.cast(keeps_growing, tf.bool), shrunk, tf.where(tf.cast(finite, tf.bool), recovered, scale))


def cosine(dot, sq_norm, other_sq_norm):
    """`(cosine, valid)` of two vectors from their dot product and squared
    norms: valid when both are non-zero and the result is finite.

    >>> [round(float(v), 3) for v in cosine(-2.0, 4.0, 1.0)]
    [-1.0, 1.0]
    >>> bool(cosine(0.0, 4.0, 0.0)[1])  # nothing to compare with
    False
    """
    dot, sq_norm, other_sq_norm = (tf.cast(v, tf.float32) for v in (dot, sq_norm, other_sq_norm))
    denominator = tf.sqrt(sq_norm) * tf.sqrt(other_sq_norm)
    value = dot / tf.maximum(denominator, 1e-30)
    valid = tf.logical_and(denominator > 0, tf.math.is_finite(value))
    return tf.where(valid, value, 0.0), valid


def update_size_update(scale, previous_ratio, update_sq_norm, weights_sq_norm, valid, auto):
    """`(scale, ratio)`: the threshold's size factor after a step while
    clipping is on, and how far the step's update moved the weights, as a
    fraction of their norm (`ratio`). The factor is multiplied by
    `(update_ratio / ratio) ** update_gain`, kept within `[min_scale, 1]`,
    while updates move the weights by less than `update_ratio` (it comes
    back) or by more and no less than the update before (`previous_ratio`:
    it shrinks). An update above the ratio but already smaller than the one
    before holds it: momentum carries earlier updates on for a few steps,
    and shrinking for them again would clip the run to nothing. An invalid
    step (no update kept, not finite, zero weights) changes nothing.

    >>> auto = AutoThreshold(update_ratio=0.01, update_gain=0.5)
    >>> [round(float(v), 4) for v in update_size_update(1.0, 0.0, 0.04 ** 2, 1.0, True, auto)]  # moved 4%
    [0.5, 0.04]
    >>> round(float(update_size_update(0.5, 0.04, 0.03 ** 2, 1.0, True, auto)[0]), 4)  # 3%, after 4%: held
    0.5
    >>> round(float(update_size_update(0.5, 0.03, 0.0025 ** 2, 1.0, True, auto)[0]), 4)  # 0.25%: back up
    1.0
    >>> [float(update_size_update(0.5, 0.0, 1.0, w, ok, auto)[0]) for w, ok in [(0.0, True), (1.0, False)]]
    [0.5, 0.5]
    """
    scale, previous_ratio, update_sq_norm, weights_sq_norm = (
        tf.cast(v, tf.float32) for v in (scale, previous_ratio, update_sq_norm, weights_sq_norm))
    ratio = tf.sqrt(update_sq_norm) / tf.sqrt(tf.maximum(weights_sq_norm, 1e-30))
    valid = tf.logical_and(tf.logical_and(tf.cast(valid, tf.bool), weights_sq_norm > 0),
                           tf.logical_and(tf.math.is_finite(ratio), ratio > 0))
    moves = tf.logical_and(valid, tf.logical_or(ratio <= auto.update_ratio, ratio >= previous_ratio))
    moved = scale * tf.pow(auto.update_ratio / tf.where(valid, ratio, 1.0), auto.update_gain)
    return (tf.where(moves, tf.clip_by_value(moved, auto.min_scale, 1.0), scale),
            tf.where(valid, ratio, previous_ratio))


# What the watch's copy of the weights holds (`DeviceState.overshoot[2]`):
# nothing yet, the last step's (clipping on), or a quiet step's before the
# switch (the first step's, then refreshed for a rollback).
KEPT_NONE, KEPT_LAST, KEPT_START = 0.0, 1.0, 2.0


def restarts(switching, kept, healthy_steps, auto):
    """Whether the run restarts at this step: clipping switches on before the
    detector has seen `auto.restart_steps` healthy steps (a run in trouble
    from its start, whose steps so far are no baseline to keep), and the
    weights before its first step were kept (`kept == KEPT_START`).

    >>> auto = AutoThreshold(restart_steps=16)
    >>> [bool(restarts(True, KEPT_START, n, auto)) for n in [5.0, 16.0]]
    [True, False]
    >>> [bool(restarts(s, k, 5.0, auto)) for s, k in [(False, KEPT_START), (True, KEPT_LAST)]]
    [False, False]
    """
    early = tf.cast(healthy_steps, tf.float32) < float(auto.restart_steps)
    return tf.logical_and(tf.logical_and(tf.cast(switching, tf.bool), early),
                          tf.equal(tf.cast(kept, tf.float32), KEPT_START))


def keeps_weights_now(kept, steps_since_kept, norm, threshold, auto):
    """Whether a step before the switch keeps the weights it saw, to go
    back to. With the rollback: the first quiet step (`norm` under
    `auto.rollback_level` times the detector's `threshold`, which is `+inf`
    at the first step) `auto.rollback_steps` steps or more after the last
    kept, and not before `auto.restart_steps` (`steps_since_kept` is huge
    before the first keep). Without it: the first step only (`kept` is
    still `KEPT_NONE`). Five scalar ops a step: the only work the rollback
    adds to a step before the switch, but for the copy itself.

    >>> auto = AutoThreshold(restart_steps=16, rollback_steps=32, rollback_level=0.3)
    >>> [bool(keeps_weights_now(KEPT_NONE, 1e9, 1.0, t, auto)) for t in [float("inf"), 2.0]]
    [True, False]
    >>> [bool(keeps_weights_now(KEPT_START, d, 1.0, 10.0, auto)) for d in [31.0, 32.0]]
    [False, True]
    >>> bool(keeps_weights_now(KEPT_START, 40.0, 3.0, 10.0, auto))  # loud: not kept
    False
    >>> no_rollback = AutoThreshold(rollback_steps=0)
    >>> [bool(keeps_weights_now(k, 40.0, 1.0, 10.0, no_rollback)) for k in [KEPT_NONE, KEPT_START]]
    [True, False]
    """
    if auto.rollback_steps <= 0:
        return tf.equal(tf.cast(kept, tf.float32), KEPT_NONE)
    due = tf.cast(steps_since_kept, tf.float32) >= float(max(auto.rollback_steps, auto.restart_steps))
    quiet = tf.cast(norm, tf.float32) < auto.rollback_level * tf.cast(threshold, tf.float32)
    return tf.logical_and(due, quiet)


def rolls_back(switching, kept, last_norm, threshold, auto):
    """Whether clipping switches on after a build-up and the run goes back to
    the weights kept at a quiet step: the last healthy step before the switch
    already had a norm (`last_norm`) of at least `auto.rollback_level` times
    the detector's `threshold`.

    >>> auto = AutoThreshold(rollback_level=0.3)
    >>> [bool(rolls_back(True, KEPT_START, n, 10.0, auto)) for n in [2.9, 3.0, 9.0]]
    [False, True, True]
    >>> [bool(rolls_back(s, k, 9.0, 10.0, auto)) for s, k in [(False, KEPT_START), (True, KEPT_LAST)]]
    [False, False]
    >>> bool(rolls_back(True, KEPT_START, 9.0, 10.0, AutoThreshold(rollback_steps=0)))
    False
    """
    loud = tf.cast(last_norm, tf.float32) >= auto.rollback_level * tf.cast(threshold, tf.float32)
    return tf.logical_and(tf.logical_and(tf.cast(switching, tf.bool), loud),
                          tf.logical_and(tf.equal(tf.cast(kept, tf.float32), KEPT_START),
                                         tf.constant(auto.rollback_steps > 0)))


def carried_uphill(average, ratio, valid, auto):
    """Whether the optimizer's momentum is carrying a clipped run uphill: the
    updates keep overshooting (the running cosine between each gradient and
    the update before it is above `overshoot_level`) and the last one still
    moved the weights by more than twice `update_ratio` of their norm. The
    clipped gradient is then too small to turn the run around (a
    learning-rate spike's momentum coasted uphill for ~20 steps, 2-7% of the
    weights a step, while the threshold shrank to 1/64), so the momentum is
    zeroed at that step (`reset_momentum`; the "gradient restart" of
    O'Donoghue and Candes 2015). Twice: at `update_ratio` itself the resets
    also stopped the momentum of runs restarted after diverging from step 1,
    whose clipped updates stay at 1-2% for tens of steps (the tanh MLP: 1.1-2.0x
    -> 1.8-3.2x the best fixed threshold). `valid`: the step measured an update.

    >>> auto = AutoThreshold()  # overshoot_level 0.1, update_ratio 0.01
    >>> [bool(carried_uphill(a, r, True, auto)) for a, r in [(0.5, 0.03), (0.05, 0.03), (0.5, 0.015)]]
    [True, False, False]
    >>> bool(carried_uphill(0.5, 0.03, False, auto))
    False
    """
    average, ratio = tf.cast(average, tf.float32), tf.cast(ratio, tf.float32)
    return tf.logical_and(tf.cast(valid, tf.bool),
                          tf.logical_and(average > auto.overshoot_level, ratio > 2.0 * auto.update_ratio))


def overshoot_update(average, count, scale, cosine, valid, auto):
    """`(average, count, scale)` after one step while clipping is on: the
    running average of the cosine between each step's gradient and the update
    before it (an exponential average over about `auto.overshoot_steps`
    steps), how many it holds, and the threshold's factor: from the second
    cosine on multiplied by `exp(-overshoot_gain * (average - overshoot_level))`,
    within `[min_scale, 1]`. An invalid cosine (no previous update, a
    non-finite step) changes nothing.

    >>> auto = AutoThreshold(overshoot_gain=1.0, overshoot_steps=3, overshoot_level=0.0)
    >>> state = (0.0, 0.0, 1.0)
    >>> for c in [0.8, 0.8, 0.8, -0.8]:
    ...     state = overshoot_update(*state, c, True, auto)
    ...     print([round(float(v), 3) for v in state])
    [0.4, 1.0, 1.0]
    [0.6, 2.0, 0.549]
    [0.7, 3.0, 0.273]
    [-0.05, 4.0, 0.287]
    """
    average, count, scale, cosine = (tf.cast(v, tf.float32) for v in (average, count, scale, cosine))
    valid = tf.cast(valid, tf.bool)
    rate = 2.0 / (auto.overshoot_steps + 1.0)
    average = tf.where(valid, average + rate * (cosine - average), average)
    count = tf.where(valid, count + 1.0, count)
    moved = tf.clip_by_value(scale * tf.exp(-auto.overshoot_gain * (average - auto.overshoot_level)),
                             auto.min_scale, 1.0)
    return average, count, tf.where(tf.logical_and(valid, count >= 2.0), moved, scale)


def bounded_threshold(window_value, baseline, scale, auto):
    """The threshold in force: `min(window value, rise * baseline) * scale`.

    >>> float(bounded_threshold(5.0, 1.0, 0.5, AutoThreshold(rise=2.0)))  # capped at 2 x baseline, halved
    1.0
    """
    return tf.minimum(tf.cast(window_value, tf.float32), auto.rise * tf.cast(baseline, tf.float32)) * scale


def window_entry(values, baseline, clipping_on, auto):
    """What a healthy step adds to the window: its statistic, at most `rise`
    times the baseline once clipping is on.

    >>> window_entry([1.0, 9.0], [2.0, 2.0], True, AutoThreshold()).numpy().tolist()  # rise 1
    [1.0, 2.0]
    """
    values = tf.cast(values, tf.float32)
    capped = tf.minimum(values, auto.rise * tf.cast(baseline, tf.float32))
    return tf.where(tf.cast(clipping_on, tf.bool), capped, values)


def capped_second_moments(moments, mode, threshold, decay, steps):
    """Second-moment slots (Adam's `v`, RMSprop's) brought back to the scale
    clipping at `threshold` lets in; used where clipping switches on.

    After `steps` steps such a slot holds `(1 - decay) * sum_s decay**(steps - s) * g_s**2`.
    Had every gradient been clipped at `threshold`, its total (`clipnorm`: per
    variable, `threshold` one value or one per slot; `global_clipnorm`: over
    all slots) would be at most `threshold**2 * (1 - decay**steps)`, and each
    entry at most that for `clipvalue`. A slot above is scaled down to it
    (`clipvalue`: its entries capped); the others come back unchanged. Why:
    the unclipped steps before the switch (a corrupted first batch, say) would
    otherwise keep dividing the optimizer's updates for ~`1 / (1 - decay)` steps.

    >>> v = [tf.constant([3.0, 1.0]), tf.constant([0.25])]
    >>> [x.numpy().tolist() for x in capped_second_moments(v, "clipnorm", 1.0, 0.5, 1)]
    [[0.375, 0.125], [0.25]]
    >>> [x.numpy().tolist() for x in capped_second_moments(v, "global_clipnorm", 1.0, 0.5, 1)]
    [[0.3529411852359772, 0.11764705926179886], [0.029411764815449715]]
    >>> [x.numpy().tolist() for x in capped_second_moments(v, "clipvalue", 1.0, 0.5, 1)]
    [[0.5, 0.5], [0.25]]
    """
    moments = [tf.cast(m, tf.float32) for m in moments]
    threshold = tf.cast(threshold, tf.float32)
    limit = tf.square(threshold) * (1.0 - tf.pow(tf.cast(decay, tf.float32), tf.cast(steps, tf.float32)))
    if mode == "clipvalue":
        return [tf.minimum(m, limit) for m in moments]
    totals = tf.stack([tf.reduce_sum(m) for m in moments])
    if mode == "global_clipnorm":
        totals = tf.fill(tf.shape(totals), tf.reduce_sum(totals))
    elif mode != "clipnorm":
        raise ValueError(f"Unknown clipping mode: {mode!r}. Expected one of {MODES}.")
    factors = tf.where(totals > limit, limit / tf.maximum(totals, 1e-30), 1.0)
    return [m * factors[i] for i, m in enumerate(moments)]


AUTO = AutoThreshold()


def _scale(grad, factor):
    factor = tf.cast(factor, grad.dtype)
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


def norm_clip_factor(sq_norm, threshold, active):
    """`t / max(norm, t)` when active, else exactly 1 (float32)."""
    norm = tf.sqrt(sq_norm)
    factor = threshold / tf.maximum(norm, threshold)
    return tf.where(active, factor, tf.ones_like(factor))


def clip_gradients(grads, mode, threshold, active):
    """Clips `grads` by `mode` at `threshold` where `active` (a bool scalar).

    For `clipnorm`, `threshold` may also be a vector: one threshold per
    gradient (`clip_threshold="auto"` per variable). When `active` is false the
    gradients come back unchanged, bit for bit.

    `active` may be the Python `True` (clipping always on: the optimizer's own
    clipping): Keras' ops alone. A tensor: one `tf.cond`, so a step with
    clipping off runs none of the clipping ops (issue 22: the per-variable
    `tf.where`s and norms were most of `auto_clip`'s cost before the switch).
    """
    if active is True:
        return _clip(grads, mode, threshold)
    return clip_if(active, grads, mode, threshold)[0]


def clip_if(active, grads, mode, threshold, extra_on=None, extra_off=()):
    """`(grads clipped if active, extra values)` in one `tf.cond`: a step with
    clipping off runs none of the clipping ops, and gets `extra_off`; one with
    clipping on gets `extra_on(clipped grads)` (a list of tensors computed in
    the branch, e.g. the clipped norm)."""
    if mode not in MODES:
        raise ValueError(f"Unknown clipping mode: {mode!r}. Expected one of {MODES}.")
    present = [i for i, g in enumerate(grads) if g is not None]
    threshold = tf.cast(threshold, tf.float32)
    inputs = [grads[i] for i in present]
    if mode == "clipvalue":  # clipped dense (as Keras does), so both branches give dense tensors
        inputs = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in inputs]
    if mode == "clipnorm" and threshold.shape.rank == 1 and len(present) < len(grads):
        threshold = tf.gather(threshold, present)

    def on():
        clipped = _clip(inputs, mode, threshold)
        full = list(grads)
        for i, g in zip(present, clipped):
            full[i] = g
        return clipped + (list(extra_on(full)) if extra_on else [])

    def off():
        return list(inputs) + [tf.convert_to_tensor(value, tf.float32) for value in extra_off]

    if not present and not extra_off:
        return list(grads), []
    outputs = tf.cond(tf.cast(active, tf.bool), on, off)
    out = list(grads)
    for i, g in zip(present, outputs):
        out[i] = g
    return out, list(outputs[len(present):])


def _clip(grads, mode, threshold):
    """Keras' clipping ops (always on)."""
    threshold = tf.cast(threshold, tf.float32)
    if mode == "clipvalue":
        return [None if g is None else _clip_value(g, threshold) for g in grads]
    if mode == "clipnorm":
        per_gradient = threshold.shape.rank == 1
        return [None if g is None else _clip_norm(g, threshold[i] if per_gradient else threshold)
                for i, g in enumerate(grads)]
    if mode == "global_clipnorm":
        return _clip_global_norm(grads, threshold)
    raise ValueError(f"Unknown clipping mode: {mode!r}. Expected one of {MODES}.")


def _clip_global_norm(grads, threshold):
    # Keras' own `clip_by_global_norm`, op for op, so the update is bit-identical:
    # scale = t * min(1 / ||g||, 1 / t), made NaN by a non-finite norm.
    present = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
               for g in grads if g is not None]
    norm = tf.sqrt(tf.reduce_sum(tf.stack([tf.reduce_sum(tf.square(g)) for g in present])))
    scale = threshold * tf.minimum(1.0 / norm, 1.0 / threshold) + (norm - norm)
    return [None if g is None else _scale(g, scale) for g in grads]


def _clip_norm(grad, threshold):
    # Keras' TensorFlow backend clips with `tf.clip_by_norm` (the norm of an
    # IndexedSlices' values); the same op keeps the update bit-identical.
    return tf.clip_by_norm(grad, threshold)


def _clip_value(grad, threshold):
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.convert_to_tensor(grad)
    limit = tf.cast(threshold, grad.dtype)
    return tf.clip_by_value(grad, -limit, limit)


def auto_statistic(mode, grads, variable_sq_norms):
    """The float32 vector one step adds to the "auto" window (see `AutoThreshold`).

    `clipnorm`: each variable's norm (`[len(grads)]`); `global_clipnorm`: the
    global norm (`[1]`); `clipvalue`: the root-mean-square entry, the global
    norm over the square root of the number of entries (`[1]`).
    """
    if mode == "clipnorm":
        return tf.sqrt(tf.cast(variable_sq_norms, tf.float32))
    if mode == "global_clipnorm":
        return tf.reshape(tf.sqrt(tf.reduce_sum(tf.cast(variable_sq_norms, tf.float32))), [1])
    if mode == "clipvalue":
        sizes = [tf.cast(tf.reduce_prod(g.dense_shape) if isinstance(g, tf.IndexedSlices) else tf.size(g),
                         tf.float32) for g in grads if g is not None]
        entries = tf.maximum(tf.add_n(sizes) if sizes else tf.constant(0.0), 1.0)
        return tf.reshape(tf.sqrt(tf.reduce_sum(tf.cast(variable_sq_norms, tf.float32)) / entries), [1])
    raise ValueError(f"Unknown clipping mode: {mode!r}. Expected one of {MODES}.")


def window_percentile(history, count, q, pooled=False):
    """The `q`-th percentile (nearest rank) of the positive entries of each
    column of the valid rows of a ring buffer `history` `[window, k]` that has
    received `count` rows (the first `min(count, window)` rows are valid); NaN
    for a column without any. Zero entries (a variable without gradient at
    that step) carry no information about the gradient's scale: they are left
    out, so a variable whose gradient is often zero is not clipped to zero.

    `pooled`: one percentile of all such entries, repeated over the `k` columns.

    >>> history = tf.constant([[1.0, 10.0], [3.0, 0.0], [2.0, 20.0], [0.0, 0.0]])
    >>> window_percentile(history, 3, 50.0).numpy().tolist()
    [2.0, 10.0]
    >>> window_percentile(history, 3, 50.0, pooled=True).numpy().tolist()
    [3.0, 3.0]
    """
    history = tf.convert_to_tensor(history, tf.float32)
    size, columns = tf.shape(history)[0], tf.shape(history)[1]
    rows = tf.range(size)[:, None] < tf.minimum(tf.cast(count, tf.int32), size)
    usable = tf.logical_and(rows, history > 0)
    masked = tf.where(usable, history, float("inf"))
    if pooled:
        masked, usable = tf.reshape(masked, [-1, 1]), tf.reshape(usable, [-1, 1])
    valid = tf.reduce_sum(tf.cast(usable, tf.int32), axis=0)  # per column
    ordered = tf.sort(masked, axis=0)
    rank = tf.cast(tf.math.ceil(q / 100.0 * tf.cast(valid, tf.float32)), tf.int32) - 1
    rank = tf.clip_by_value(rank, 0, tf.shape(masked)[0] - 1)
    chosen = tf.gather(tf.transpose(ordered), rank[:, None], batch_dims=1)[:, 0]
    chosen = tf.where(valid > 0, chosen, float("nan"))
    return tf.broadcast_to(chosen, [columns])

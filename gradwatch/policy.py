"""The per-step decision inside the compiled step: detection, clipping, skip.

`StepPolicy.decide` reads and updates the `DeviceState` variables with
branch-free ops (`tf.where`), so the same trace serves every step: the step
whose explosion switches clipping on is itself clipped (zero lag).
"""

import dataclasses
import math
from typing import NamedTuple, Optional, Union

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from gradwatch import clipping, detection, state


# With `auto_clip` and a fixed clipping threshold t, a global norm >= 100 t
# switches clipping on even before the adaptive detector has a baseline: a
# run whose first steps are already far outside the range the user chose to
# clip at is exploding by the user's own measure.
CLIP_EXPLOSION_FACTOR = 100.0


class StepResult(NamedTuple):
    threshold: tf.Tensor  # explosion threshold in force (inf in warm-up)
    exploded: tf.Tensor
    clip_active: tf.Tensor  # clipping applies to this step
    clip_threshold: tf.Tensor  # per column of the "auto" window (`[1]` unless per variable)
    skip: tf.Tensor  # the update is skipped (non-finite gradient)
    switching: tf.Tensor  # clipping switches on at this step
    flags: tf.Tensor  # float32 bit set, see `state`
    shrinking: tf.Tensor  # "auto": clipped norms doubled again, the threshold shrinks at this step
    restarting: tf.Tensor  # "auto": the weights go back to those before the first step (`AutoThreshold.restart_steps`)
    uphill: tf.Tensor  # "auto": the momentum carries the clipped run uphill (`clipping.carried_uphill`)


@dataclasses.dataclass(frozen=True)
class StepPolicy:
    """Detection and clipping settings of one run (validated by the monitor).

    Attributes:
        explosion_threshold: a fixed threshold, or None for the adaptive one.
        adaptive: settings of the adaptive detector.
        clip_mode: the clipping gradwatch applies (`auto_clip`, or the
            optimizer's own clipping, which gradwatch takes over), or None.
        clip_threshold: a number, or "auto".
        auto: how "auto" sets the threshold (`clipping.AutoThreshold`).
        auto_switch: switch clipping on at the first finite explosion.
        skip_nonfinite: skip updates whose gradient holds NaN/Inf.
        reset_momentum: zero the optimizer's momentum slots at the switch.
    """

    explosion_threshold: Optional[float] = None
    adaptive: detection.AdaptiveConfig = detection.AdaptiveConfig()
    clip_mode: Optional[str] = None
    clip_threshold: Union[float, str] = 1.0
    auto: clipping.AutoThreshold = clipping.AUTO
    auto_switch: bool = False
    skip_nonfinite: bool = False
    reset_momentum: bool = False

    @property
    def decides_in_graph(self):
        """The step itself needs the decision (it may clip or skip); else the
        host detects, on the drained records (`HostDetector`)."""
        return self.clip_mode is not None or self.skip_nonfinite

    def initial_adaptive_state(self):
        """The adaptive detector's initial state, packed `[count, *window]`."""
        return _pack(detection.initial_adaptive_state(self.adaptive))

    @property
    def is_auto(self):
        return self.clip_mode is not None and self.clip_threshold == "auto"

    def auto_columns(self, num_variables):
        """Columns of the "auto" window: one per variable for per-variable (or
        pooled) `clipnorm` statistics, else one."""
        return num_variables if self.clip_mode == "clipnorm" else 1

    @staticmethod
    def recorded_threshold(clip_threshold):
        """The one number recorded (and set on the optimizer) for a step's
        clipping threshold(s): the threshold; for per-variable `clipnorm`
        thresholds, the largest one (no variable is clipped above it)."""
        return tf.reduce_max(clip_threshold)

    def decide(self, device_state, global_norm, nonfinite, auto_values=None, grads_and_vars=None, step=None):
        """`auto_values`: with `clip_threshold="auto"`, this step's statistic
        (`clipping.auto_statistic`, one entry per column of the window).
        `grads_and_vars`: the step's gradients and variables, with
        `AutoThreshold.overshoot_gain` (and `device_state.previous_weights` of
        the variables' shapes, in order); else None. `step`: this step's
        number, kept with the weights a restart or rollback goes back to."""
        threshold, adaptive_state, log_typical = self._threshold(device_state)
        exploded = detection.is_explosion(global_norm, threshold)
        rejudged = None
        if self.restarts and self.auto.rejudges_start:
            rejudged = detection.start_rejudged(adaptive_state, log_typical, self.auto.restart_steps,
                                                self.auto.rejudge_ratio, self.adaptive)
        if self.explosion_threshold is None:
            _update_adaptive(device_state, self.adaptive, global_norm, exploded)
        if self.clip_mode is None:  # monitor only: no clipping state to read or keep
            false = tf.constant(False)
            clip_active, switching, clip_threshold, shrinking, restarting, uphill = (
                false, false, tf.constant([0.0]), false, false, false)
        else:
            clip_active, switching, clip_threshold, shrinking, restarting, uphill = self._update_clipping(
                device_state, auto_values, threshold, exploded, nonfinite, global_norm, grads_and_vars, step,
                rejudged)
        skip = tf.logical_and(tf.constant(self.skip_nonfinite), nonfinite)
        flags = _flags(exploded, nonfinite, skip, switching, clip_active, restarting)
        return StepResult(threshold, exploded, clip_active, clip_threshold, skip, switching, flags, shrinking,
                          restarting, uphill)

    @property
    def restarts(self):
        """A switch may take the run back to kept weights (`AutoThreshold.restart_steps`,
        `rollback_steps`): "auto", switched on by the adaptive detector."""
        return self.is_auto and self.auto_switch and self.explosion_threshold is None and self.auto.goes_back

    def _update_clipping(self, device_state, auto_values, threshold, exploded, nonfinite, global_norm,
                         grads_and_vars=None, step=None, rejudged=None):
        """In-graph: `(clip_active, switching, clip_threshold, shrinking, restarting, uphill)` of this step."""
        was_active = device_state.clip_active.read_value()
        finite_explosion = tf.logical_and(exploded, tf.logical_not(nonfinite))
        # The first steps judged again (never at a non-finite step: it is skipped or applied as is).
        cause = finite_explosion if rejudged is None else tf.logical_or(
            finite_explosion, tf.logical_and(rejudged, tf.logical_not(nonfinite)))
        switching = tf.logical_and(tf.constant(self.auto_switch),
                                   tf.logical_and(tf.logical_not(was_active), cause))
        clip_active = tf.logical_or(was_active, switching)
        shrinking = restarting = uphill = tf.constant(False)
        if self.clip_threshold == "auto":
            clip_threshold, shrinking, restarting, uphill = self._auto_threshold(
                device_state, auto_values, threshold, global_norm, was_active, switching, finite_explosion,
                nonfinite, grads_and_vars, step, rejudged)
            device_state.clip_threshold.assign(clip_threshold)
        else:  # a constant: `device_state.clip_threshold` keeps what `set_clip_state` wrote, no per-step write
            clip_threshold = tf.constant([float(self.clip_threshold)], tf.float32)
        if self.auto_switch:
            device_state.clip_active.assign(clip_active)
        return clip_active, switching, clip_threshold, shrinking, restarting, uphill

    def _auto_threshold(self, device_state, auto_values, explosion_threshold, global_norm,
                        was_active, switching, finite_explosion, nonfinite, grads_and_vars=None, step=None,
                        rejudged=None):
        """In-graph: the "auto" threshold of this step (`clipping.AutoThreshold`),
        whether it shrinks at this step (the clipped norms doubled again),
        whether the run goes back to kept weights (a restart or a rollback, decided
        at the switch) and whether the momentum carries it uphill.
        The window's percentile is computed (sorted) only while clipping is on;
        with `follow=False` only at the switch."""
        auto = self.auto
        baseline = device_state.auto_base.read_value()
        healthy = tf.logical_not(tf.logical_or(finite_explosion, nonfinite))
        device_state.remember(clipping.window_entry(auto_values, baseline, was_active, auto), healthy)

        def from_window():
            pooled = self.clip_mode == "clipnorm" and not auto.per_variable
            chosen = clipping.window_percentile(device_state.auto_window.read_value(),
                                                device_state.auto_count.read_value(), auto.percentile, pooled)
            # A variable without any non-zero healthy norm yet: the largest
            # threshold of the others. No healthy step seen at all (a fixed
            # `explosion_threshold` crossed at the first step): the explosion
            # threshold, else 1.
            known = tf.math.is_finite(chosen)
            others = tf.reduce_max(tf.where(known, chosen, -1.0))
            fallback = tf.where(tf.math.is_finite(explosion_threshold), explosion_threshold, 1.0)
            fallback = tf.where(tf.reduce_any(known), others, fallback)
            return tf.where(known, chosen, fallback)

        def typical():  # the detector's typical norm (its median)
            median, _ = detection.typical_and_spread(_adaptive_state(device_state), self.adaptive)
            return tf.exp(median)

        clip_active = tf.logical_or(was_active, switching)

        # The elevation (off by default): clipped at the healthy scale, the run's typical
        # norm stays `elevation` times the one at the switch: the threshold keeps shrinking.
        # (With a fixed `explosion_threshold` there is no detector window.)
        elevation_on = self.explosion_threshold is None and auto.elevation != math.inf
        # The overshoot watch: the weights kept from one step to the next while clipping is on.
        keeps_weights = grads_and_vars is not None and hasattr(device_state, "previous_weights")
        watch_overshoot = auto.watches_overshoot and keeps_weights
        # The restart and the rollback: the weights of a quiet step (the first, then
        # refreshed), kept until the switch.
        restart_on = keeps_weights and self.restarts
        if restart_on:
            packed_overshoot = device_state.overshoot.read_value()
            kept, kept_step = packed_overshoot[2], packed_overshoot[state.KEPT_STEP]

        def clipping_on():
            restarting = tf.constant(False)
            if restart_on:  # decided here: no cost before the switch
                adaptive_state = _adaptive_state(device_state)
                restarting = tf.logical_or(
                    clipping.restarts(switching, kept, adaptive_state.count, auto),
                    clipping.rolls_back(switching, kept, detection.last_norm(adaptive_state, self.adaptive),
                                        explosion_threshold, auto))
                if rejudged is not None:
                    restarting = tf.logical_or(restarting, tf.logical_and(switching, rejudged))
            # The window's percentile: every step while clipping is on, or, with
            # `follow=False`, at the switch only.
            if auto.follow:
                window_value = from_window()
            else:
                window_value = tf.cond(switching, from_window, lambda: baseline)
            new_baseline = tf.where(switching, window_value, baseline)
            device_state.auto_base.assign(new_baseline)
            elevated = tf.constant(False)
            if elevation_on:
                typical_now = typical()
                typical_base = tf.where(switching, typical_now, device_state.typical_base.read_value())
                device_state.typical_base.assign(typical_base)
                elevated = tf.logical_and(was_active, typical_now >= auto.elevation * typical_base)
            # The shrinking: a clipped step that still explodes with a norm at
            # least 1 / shrink times the reference (the norm at the switch or at
            # the last shrink) shrinks the threshold in proportion and becomes
            # the reference.
            reference = device_state.reference_norm.read_value()
            keeps_growing = tf.logical_and(tf.logical_and(was_active, finite_explosion),
                                           clipping.grew(global_norm, reference, auto))
            scale = clipping.auto_scale(device_state.auto_scale.read_value(), keeps_growing,
                                        tf.logical_not(nonfinite), auto, factor=reference / global_norm,
                                        elevated=elevated)
            device_state.reference_norm.assign(
                tf.where(tf.logical_or(switching, keeps_growing), global_norm, reference))
            device_state.auto_scale.assign(scale)
            threshold = clipping.bounded_threshold(window_value, new_baseline, scale, auto)
            if watch_overshoot:  # in a branch of its own: healthy steps pass it as one dead node
                def watch():
                    # After the first steps judged again, the distance moved since the start is
                    # `window` steps' worth, not one step's: not measured as an update.
                    measured = restarting if rejudged is None else tf.logical_and(restarting, tf.logical_not(rejudged))
                    return _watch_overshoot(device_state, grads_and_vars, global_norm, nonfinite, auto, restarting,
                                            measured)
                unwatched = lambda: (tf.ones([], tf.float32), tf.constant(False))  # noqa: E731
                factor, uphill = unlowered_cond(clip_active, watch, unwatched)
                return threshold * factor, keeps_growing, restarting, uphill
            return threshold, keeps_growing, restarting, tf.constant(False)

        def clipping_off():
            # Clipping has never been on (it never switches off): the baseline,
            # scale (1) and reference stay as they are, and the threshold is
            # not used (the record's CLIP_THRESHOLD is 0 and nothing is clipped).
            # So none of the window's statistics are computed before the switch.
            if restart_on:  # the weights of the first step, then of a quiet step every `rollback_steps`
                this_step = tf.cast(step if step is not None else -1, tf.float32)

                def keep_weights():  # (one untaken `If` on the other steps)
                    for kept_weights, (_, v) in zip(device_state.previous_weights, grads_and_vars):
                        kept_weights.assign(tf.cast(state.variable_value(v), tf.float32))
                    device_state.overshoot.assign(tf.tensor_scatter_nd_update(
                        packed_overshoot, [[2], [state.KEPT_STEP]],
                        tf.stack([tf.constant(clipping.KEPT_START), this_step])))
                    return tf.constant(True)
                if step is not None:
                    since = this_step - kept_step
                else:  # no step number: the first step's weights only
                    since = tf.where(tf.equal(kept, clipping.KEPT_NONE), -state.NOT_KEPT, 0.0)
                keep = clipping.keeps_weights_now(kept, since, global_norm, explosion_threshold, auto)
                unlowered_cond(keep, keep_weights, lambda: tf.constant(False))
            return tf.zeros_like(baseline), tf.constant(False), tf.constant(False), tf.constant(False)

        return tf.cond(clip_active, clipping_on, clipping_off)

    def _threshold(self, device_state):
        """`(threshold, adaptive state, log typical norm)`: the explosion threshold of
        this step, and (adaptive detector) the state and median it comes from."""
        if self.explosion_threshold is not None:
            return tf.constant(float(self.explosion_threshold), tf.float32), None, None
        adaptive_state = _adaptive_state(device_state)
        threshold, log_typical = detection.threshold_and_typical(adaptive_state, self.adaptive)
        if not self.auto_switch or self.clip_threshold == "auto":
            return threshold, adaptive_state, log_typical
        # Until clipping is on, a norm CLIP_EXPLOSION_FACTOR times the chosen
        # clipping threshold explodes too, from the first step (when the
        # adaptive detector has no baseline yet).
        bound = tf.minimum(threshold, CLIP_EXPLOSION_FACTOR * float(self.clip_threshold))
        return tf.where(device_state.clip_active.read_value(), threshold, bound), adaptive_state, log_typical


def _watch_overshoot(device_state, grads_and_vars, global_norm, nonfinite, auto, restarting=False, measured=None):
    """In-graph, while clipping is on: the cosine between this step's gradient
    and the update made at the step before (the weights now minus the weights
    kept then, `clipping.cosine`), its running average and the threshold's
    factor (`clipping.overshoot_update`); that update's size against the
    weights' and the size factor (`clipping.update_size_update`); the weights
    kept for the next step. At a restart the weights kept are those it
    restarts from, and (`measured`, default: at every restart) the "update"
    is everything the run moved since its first step. Returns the two
    factors' product (at least `min_scale`) and whether the momentum carries
    the run uphill (`clipping.carried_uphill`)."""
    dense = [tf.cast(tf.convert_to_tensor(g), tf.float32) for g, _ in grads_and_vars]
    weights = [tf.cast(state.variable_value(v), tf.float32) for _, v in grads_and_vars]
    updates = [w - p.read_value() for w, p in zip(weights, device_state.previous_weights)]
    dot = tf.add_n([tf.reduce_sum(g * u) for g, u in zip(dense, updates)])
    sq_norm = tf.square(tf.cast(global_norm, tf.float32))  # the gradient's, as the step measured it
    update_sq_norm = tf.add_n([tf.reduce_sum(tf.square(u)) for u in updates])
    weights_sq_norm = tf.add_n([tf.reduce_sum(tf.square(w)) for w in weights])
    # [average, count, weights kept, cosine factor, size factor, last ratio, step kept]
    average, count, kept, scale, size, ratio, kept_step = tf.unstack(device_state.overshoot.read_value())
    finite = tf.logical_not(nonfinite)
    restarting = tf.cast(restarting, tf.bool)
    # The weights of the step before, or at a restart those before the first step
    # (kept before the switch: stale at a later switch).
    measured = restarting if measured is None else tf.cast(measured, tf.bool)
    valid_update = tf.logical_and(finite, tf.logical_or(tf.equal(kept, clipping.KEPT_LAST), measured))
    value, valid = clipping.cosine(dot, sq_norm, update_sq_norm)
    average, count, scale = clipping.overshoot_update(average, count, scale, value,
                                                      tf.logical_and(valid, valid_update), auto)
    size, ratio = clipping.update_size_update(size, ratio, update_sq_norm, weights_sq_norm, valid_update, auto)
    kept = tf.where(tf.logical_or(finite, restarting), clipping.KEPT_LAST, kept)
    device_state.overshoot.assign(tf.stack([average, count, kept, scale, size, ratio, kept_step]))
    for kept_weights, w in zip(device_state.previous_weights, weights):
        # At a restart the weights now are those kept (the capture restores them).
        kept_weights.assign(tf.where(tf.logical_and(finite, tf.logical_not(restarting)), w, kept_weights.read_value()))
    uphill = clipping.carried_uphill(average, ratio, valid_update, auto)
    return tf.maximum(scale * size, auto.min_scale), uphill


def unlowered_cond(pred, true_fn, false_fn):
    """`tf.cond`, kept a functional `If` in a traced graph (not lowered to
    Switch/Merge): inside another cond's untaken branch it is one dead node,
    where a lowered one passes every op of its branches as dead nodes (measured:
    the overshoot watch's ~130 ops cost 0.08 of a 4 ms step that never ran them,
    `benchmarks/README.md`). Eagerly, a plain `tf.cond`."""
    graph = tf.compat.v1.get_default_graph()
    before = len(graph.get_operations()) if not tf.executing_eagerly() else None
    result = tf.cond(pred, true_fn, false_fn)
    if before is not None:
        for op in graph.get_operations()[before:]:
            if op.type in ("If", "StatelessIf"):
                op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return result


def _update_adaptive(device_state, config, global_norm, exploded):
    new = detection.update_adaptive_state(_adaptive_state(device_state), global_norm, exploded, config)
    device_state.adaptive.assign(_pack(new))


def _pack(adaptive_state):
    return tf.concat([tf.reshape(adaptive_state.count, [1]), adaptive_state.log_norms], axis=0)


def _adaptive_state(device_state):
    packed = device_state.adaptive.read_value()
    return detection.AdaptiveState(packed[0], packed[1:])


_FLAG_BITS = (state.EXPLODED, state.NONFINITE, state.SKIPPED, state.CLIP_SWITCHED_ON, state.CLIP_ACTIVE,
              state.RESTARTED)


def _flags(exploded, nonfinite, skip, switching, clip_active, restarting):
    """The FLAGS column: a float32 bit set (one stack, cast and dot product)."""
    bits = tf.cast(tf.stack([exploded, nonfinite, skip, switching, clip_active, restarting]), tf.float32)
    return tf.reduce_sum(bits * tf.constant(_FLAG_BITS, tf.float32))


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class HostDetector:
    """Explosion detection on the host, for runs where nothing in the step
    depends on it (no clipping, no skipping): the same maths as `decide`, on
    Python floats (`detection.FLOAT_OPS`), a few microseconds a record instead
    of ~40 ops in every train step.

    `detect(rows)` fills the THRESHOLD column and the EXPLODED and NONFINITE
    flags of drained records (`gradwatch.state` layout), in step order; the
    statistics carry over from one call, and one `fit()`, to the next.

    Example:

    >>> import numpy as np
    >>> rows = np.zeros([2, state.LAYERS_START])
    >>> rows[:, state.GLOBAL] = [1.0, 20.0]
    >>> HostDetector(StepPolicy(explosion_threshold=10.0)).detect(rows)
    >>> rows[:, state.THRESHOLD].tolist(), state.has_flag(rows[:, state.FLAGS], state.EXPLODED).tolist()
    ([10.0, 10.0], [False, True])
    """

    def __init__(self, policy):
        self.policy = policy
        self._detector = detection.FloatDetector(policy.adaptive)

    @property
    def adaptive_state(self):
        """The adaptive detector's state (`detection.AdaptiveState`, `FLOAT_OPS` form)."""
        return self._detector.state

    def next_threshold(self):
        """The threshold the next step will be judged against."""
        if self.policy.explosion_threshold is not None:
            return float(self.policy.explosion_threshold)
        return float(self._detector.threshold)

    def detect(self, rows):
        if len(rows) == 1:  # a drain every step (`update_freq=1`): no numpy column ops
            row = rows[0]
            flags, norm = int(row[state.FLAGS]), float(row[state.GLOBAL])
            if not flags & state.OVERFLOW:
                threshold, exploded = self._judge(norm)
                row[state.THRESHOLD] = threshold
                row[state.FLAGS] = (flags | (state.EXPLODED if exploded else 0)
                                    | (0 if math.isfinite(norm) else state.NONFINITE))
            return
        fixed = self.policy.explosion_threshold
        fixed = None if fixed is None else float(fixed)
        step = self._detector.step
        flags_column = rows[:, state.FLAGS].tolist()
        norms = rows[:, state.GLOBAL].tolist()
        thresholds, new_flags = rows[:, state.THRESHOLD].tolist(), []
        for index, (flags, norm) in enumerate(zip(flags_column, norms)):
            flags = int(flags)
            if flags & state.OVERFLOW:  # skipped by the loss-scale optimizer: not a step
                new_flags.append(flags)
                continue
            if fixed is None:
                exploded, threshold = step(norm)
            else:
                threshold = fixed
                exploded = norm >= threshold or math.isnan(norm)
            thresholds[index] = threshold
            new_flags.append(flags | (state.EXPLODED if exploded else 0)
                             | (0 if math.isfinite(norm) else state.NONFINITE))
        rows[:, state.THRESHOLD] = thresholds
        rows[:, state.FLAGS] = new_flags

    def _judge(self, norm):
        """`(threshold, exploded)` of one step's global norm (the window updated)."""
        fixed = self.policy.explosion_threshold
        if fixed is None:
            exploded, threshold = self._detector.step(norm)
            return threshold, exploded
        threshold = float(fixed)
        return threshold, norm >= threshold or math.isnan(norm)

"""The vanishing / dead-gradient detector as pure functions, against a plain-Python reference."""

import doctest
import math

import numpy as np
import pytest

from gradwatch import vanishing
from gradwatch.vanishing import DEAD, VANISHING, VanishingConfig, init, scan


class Reference:
    """Independent reimplementation: Python floats, one layer at a time, no numpy."""

    def __init__(self, num_layers, sizes, sparse, config):
        self.n, self.sizes, self.sparse, self.c = num_layers, list(sizes), list(sparse), config
        self.below = [0] * num_layers
        self.above = [0] * num_layers
        self.vanishing = [False] * num_layers
        self.seen = [0] * num_layers
        self.run = [0] * num_layers
        self.zeros = [0] * num_layers
        self.dead = [False] * num_layers
        self.onsets = {VANISHING: [0] * num_layers, DEAD: [0] * num_layers}

    def step(self, norms, is_step=True):
        """Events of one row: [(kind, onset, layer)]; vanishing is judged before dead."""
        events = []
        good = [is_step and math.isfinite(v) for v in norms]
        scale = math.sqrt(sum(v * v for v, g in zip(norms, good) if g))
        # Gaps: every positive finite non-sparse norm of the row is judged and a reference.
        log_rms = [math.log10(v) - 0.5 * math.log10(self.sizes[i]) if good[i] and v > 0 and not self.sparse[i]
                   else None for i, v in enumerate(norms)]
        for i in range(self.n):
            after = [x for x in log_rms[i + 1:] if x is not None]
            if log_rms[i] is None or not after:
                continue
            gap = log_rms[i] - sum(after) / len(after)
            if gap <= -self.c.orders:
                self.below[i], self.above[i] = self.below[i] + 1, 0
            else:
                self.below[i], self.above[i] = 0, self.above[i] + 1
            if (not self.vanishing[i] and not self.dead[i]
                    and self.below[i] >= self.c.window * 2 ** self.onsets[VANISHING][i]):
                self.vanishing[i] = True
                self.onsets[VANISHING][i] += 1
                events.append((VANISHING, True, i))
            elif self.vanishing[i] and self.above[i] >= self.c.window:
                self.vanishing[i] = False
                events.append((VANISHING, False, i))
        for i, v in enumerate(norms):
            if not good[i]:
                continue
            if v > 0 and v > scale / 2 ** 24:
                self.zeros[i] += self.run[i]
                self.run[i] = 0
                if self.dead[i]:
                    self.dead[i] = False
                    events.append((DEAD, False, i))
                self.seen[i] += 1
            elif self.seen[i] > 0:
                self.run[i] += 1
                p = (self.zeros[i] + 1) / (self.zeros[i] + self.seen[i] + 2)
                needed = max(self.c.dead_steps * 2 ** self.onsets[DEAD][i],
                             math.ceil(math.log(self.c.dead_chance) / math.log(p)))
                if not self.dead[i] and not self.vanishing[i] and self.run[i] >= needed:
                    self.dead[i] = True
                    self.onsets[DEAD][i] += 1
                    events.append((DEAD, True, i))
        return events


def flat_events(events):
    return sorted((e.row, e.kind, e.onset, layer) for e in events for layer in e.layers)


def random_run(seed, steps=400, layers=6):
    """Norms with vanishing stretches, dead stretches, intermittent zeros, NaN and overflow rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5000, layers)
    scale = np.sqrt(sizes) * 10.0 ** rng.normal(0, 0.3, layers)
    norms = scale * 10.0 ** rng.normal(0, 0.4, (steps, layers))
    for _ in range(4):
        layer, start = rng.integers(0, layers), rng.integers(0, steps)
        length = rng.integers(40, 250)
        kind = rng.integers(0, 4)
        if kind == 0:
            norms[start:start + length, layer] = 0.0
        elif kind == 1:
            norms[start:start + length, layer] *= 10.0 ** -rng.uniform(2, 7)
        elif kind == 2:
            norms[start:start + length, layer] *= rng.random(min(length, steps - start)) < 0.3
        else:
            norms[start:start + length, layer] *= 1e-12  # below float32 resolution of the step's gradient
    norms[rng.integers(0, steps, 5), rng.integers(0, layers, 5)] = np.nan
    norms[:, rng.integers(0, layers)] *= rng.random() < 0.3  # sometimes a layer never has a gradient
    steps_ok = rng.random(steps) > 0.02
    sparse = rng.random(layers) < 0.2
    return norms, sizes, sparse, steps_ok


CONFIGS = [VanishingConfig(), VanishingConfig(orders=1.5, window=7, dead_steps=5, dead_chance=1e-3)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", range(6))
def test_scan_matches_the_reference(seed, config):
    norms, sizes, sparse, steps_ok = random_run(seed)
    reference = Reference(norms.shape[1], sizes, sparse, config)
    expected = sorted((row, kind, onset, layer) for row in range(len(norms))
                      for kind, onset, layer in reference.step(list(norms[row]), bool(steps_ok[row])))
    _, events = scan(init(norms.shape[1]), norms, sizes, sparse, config, steps_ok)
    assert flat_events(events) == expected


@pytest.mark.parametrize("config, exercised", [
    (CONFIGS[0], {(VANISHING, True), (DEAD, True)}),
    (CONFIGS[1], {(VANISHING, True), (VANISHING, False), (DEAD, True), (DEAD, False)})])
def test_the_random_runs_exercise_the_rules(config, exercised):
    kinds = set()
    for seed in range(12):
        norms, sizes, sparse, steps_ok = random_run(seed)
        _, events = scan(init(norms.shape[1]), norms, sizes, sparse, config, steps_ok)
        kinds |= {(e.kind, e.onset) for e in events}
    assert exercised <= kinds


@pytest.mark.parametrize("piece", [1, 5, 37, 160])
@pytest.mark.parametrize("config", CONFIGS)
def test_scanning_in_pieces_gives_the_same_events(piece, config):
    # Pieces without a change of flag take the all-at-once path: it must agree with the row-by-row one.
    for seed in range(4):
        norms, sizes, sparse, steps_ok = random_run(seed)
        whole_state, whole = scan(init(norms.shape[1]), norms, sizes, sparse, config, steps_ok)
        state, pieces = init(norms.shape[1]), []
        for start in range(0, len(norms), piece):
            state, events = scan(state, norms[start:start + piece], sizes, sparse, config,
                                 steps_ok[start:start + piece])
            pieces += [e._replace(row=e.row + start) for e in events]
        assert flat_events(pieces) == flat_events(whole)
        for got, expected in zip(state, whole_state):
            np.testing.assert_array_equal(got, expected)


def test_scan_does_not_change_its_input_state():
    state = init(2)
    scan(state, np.array([[1e-9, 1.0]] * 60), [1, 1], [False, False], VanishingConfig())
    assert state.below.tolist() == [0, 0] and not state.vanishing.any()


def test_vanishing_onset_after_exactly_window_steps_and_recovery_after_window_above():
    config = VanishingConfig(orders=3, window=10)
    low = np.array([[1e-4, 1.0, 1.0]] * 25)  # 4 orders below
    high = np.array([[1e-2, 1.0, 1.0]] * 25)  # 2 orders below: healthy
    _, events = scan(init(3), np.concatenate([low, high, low[:19]]), [1, 1, 1], [False] * 3, config)
    assert [(e.row, e.kind, e.onset, e.layers) for e in events] == [
        (9, VANISHING, True, (0,)), (34, VANISHING, False, (0,))]  # the second time, 20 steps are needed
    _, events = scan(init(3), np.concatenate([low, high, low, low]), [1, 1, 1], [False] * 3, config)
    assert [(e.row, e.onset) for e in events] == [(9, True), (34, False), (69, True)]
    assert events[0].values[0] == pytest.approx(-4.0)


def test_one_alert_while_a_layer_flickers_around_the_bound():
    config = VanishingConfig(orders=3, window=10)
    gaps = np.where(np.arange(500) % 7 == 0, -2.0, -4.0)  # above the bound every 7th step
    norms = np.stack([10.0 ** gaps, np.ones(500)], axis=1)
    _, events = scan(init(2), norms, [1, 1], [False, False], config)
    assert events == []
    gaps[:20] = -4.0
    _, events = scan(init(2), np.stack([10.0 ** gaps, np.ones(500)], axis=1), [1, 1], [False, False], config)
    assert [(e.row, e.onset) for e in events] == [(9, True)]  # 9 steps above never arrive in a row


def test_per_parameter_rms_a_small_layer_is_not_vanishing():
    # 1e6 parameters with norm 1e3 and 1 parameter with norm 1: the same RMS.
    norms = np.array([[1.0, 1e3]] * 100)
    _, events = scan(init(2), norms, [1, 10**6], [False, False], VanishingConfig(window=10))
    assert events == []
    _, events = scan(init(2), norms, [10**6, 1], [False, False], VanishingConfig(window=10))
    assert [(e.kind, e.layers) for e in events] == [(VANISHING, (0,))]  # 6 orders below


def test_sparse_layers_are_neither_judged_nor_a_reference():
    norms = np.array([[1e-6, 1.0, 1e6]] * 100)
    _, events = scan(init(3), norms, [1, 1, 1], [True, False, True], VanishingConfig(window=10))
    assert events == []


def test_the_last_layer_is_never_vanishing():
    _, events = scan(init(2), np.array([[1.0, 1e-9]] * 100), [1, 1], [False, False], VanishingConfig(window=10))
    assert events == []


def test_dead_after_dead_steps_zero_steps_and_alive_at_the_first_gradient():
    config = VanishingConfig(dead_steps=20)
    norms = np.ones((200, 2))
    norms[100:150, 0] = 0.0
    norms[150:, 0] = 1e-8  # below float32 resolution of the step's gradient (1): still dead
    norms[180, 0] = 0.5
    _, events = scan(init(2), norms, [1, 1], [False, False], config)
    assert [(e.row, e.kind, e.onset, e.layers) for e in events] == [
        (119, DEAD, True, (0,)), (180, DEAD, False, (0,))]
    assert events[0].values == (20,)


def test_a_layer_that_never_had_a_gradient_is_never_dead():
    norms = np.zeros((500, 2))
    norms[:, 1] = 1.0
    _, events = scan(init(2), norms, [1, 1], [False, False], VanishingConfig())
    assert events == []


def test_nan_and_overflow_rows_change_nothing():
    config = VanishingConfig(dead_steps=10)
    norms = np.ones((40, 2))
    norms[10:, 0] = 0.0
    _, plain = scan(init(2), norms, [1, 1], [False, False], config)
    mixed = np.insert(norms, 15, [[np.nan, np.nan], [5.0, 5.0]], axis=0)  # a NaN step, an overflow row
    ok = np.ones(len(mixed), bool)
    ok[16] = False
    _, events = scan(init(2), mixed, [1, 1], [False, False], config, ok)
    assert [(e.row, e.layers) for e in plain] == [(19, (0,))]
    assert [(e.row, e.layers) for e in events] == [(21, (0,))]  # two rows later, same zero count


def test_a_layer_often_off_needs_a_silence_unlikely_by_chance():
    config = VanishingConfig()
    assert vanishing.required_zero_run(0, 1000, config) == 50
    assert vanishing.required_zero_run(900, 100, config) == math.ceil(math.log(1e-6) / math.log(901 / 1002))
    assert vanishing.required_zero_run(899, 99, config) == 132  # off 90% of the time
    assert vanishing.required_zero_run(0, 1000, config, onsets=3) == 400  # flagged 3 times before
    rng = np.random.default_rng(0)
    used = rng.random(5000) < 0.1  # a head with labels on 10% of the batches
    used[:3] = True
    norms = np.stack([np.where(used, 1.0, 0.0), np.ones(5000)], axis=1)
    longest = max(len(run) for run in "".join("1" if u else "0" for u in used).split("1"))
    assert longest > 50  # a fixed 50-step rule would alarm
    _, events = scan(init(2), norms, [1, 1], [False, False], config)
    assert events == []


def test_recovered_layer_alerts_less_often():
    config = VanishingConfig(dead_steps=10)
    pattern = ([1.0] * 20 + [0.0] * 30) * 20  # off 60% of the time, in runs of 30
    norms = np.stack([pattern, np.ones(len(pattern))], axis=1)
    _, events = scan(init(2), norms, [1, 1], [False, False], config)
    onsets = [e.row for e in events if e.onset]
    assert onsets == [29, 89]  # 10 zero steps in a row, then 20; then 40 would be needed: never, not 20 alerts


def test_layer_sizes_sum_variables_per_layer():
    class V:
        def __init__(self, *shape):
            self.shape = shape

    a, b, c = V(3, 4), V(4), V(7)
    sizes = vanishing.layer_sizes([a, b, c], {id(a): 0, id(b): 0, id(c): 1}, 3)
    assert sizes.tolist() == [16, 7, 1]  # a layer without variables counts 1


@pytest.mark.parametrize("field, value", [("orders", 0), ("orders", math.nan), ("window", 0), ("window", 2.5),
                                          ("window", True), ("dead_steps", -1), ("dead_chance", 1.0),
                                          ("dead_chance", 0)])
def test_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=f"`{field}`.*Received: {field}="):
        VanishingConfig(**{field: value})


def test_scan_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="norms"):
        scan(init(3), np.ones((4, 2)), [1, 1, 1], [False] * 3, VanishingConfig())


def test_doctest():
    assert doctest.testmod(vanishing).failed == 0

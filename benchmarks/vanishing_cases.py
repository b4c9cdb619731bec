"""Healthy and constructed runs for the vanishing / dead detector (`gradwatch.vanishing`).

Used by `python benchmarks/false_alarms.py --vanishing`. Each run trains a
small Keras model with a `tf.GradientTape` loop and records, per step, the
per-layer gradient norms exactly as the monitor groups them
(`gradwatch.stats.layer_paths`, `IndexedSlices` rows combined), the layers'
parameter counts and which layers get sparse gradients. The norms are then
replayed through `gradwatch.vanishing.scan`.

Healthy runs must raise nothing. Constructed runs must be caught, in the layers
listed, soon after the step the problem starts (`EXPECTED`).
"""

import numpy as np
import keras
import tensorflow as tf

from gradwatch import stats, vanishing

layers = keras.layers
STEPS = 400
BATCH = 32


def _deep(width=64, depth=12, activation="relu", norm=None, init="glorot_uniform", residual=False):
    inputs = layers.Input((20,))
    x = layers.Dense(width, name="d0")(inputs)
    for i in range(1, depth):
        y = layers.Dense(width, kernel_initializer=init, name=f"d{i}")(x)
        if norm == "batch":
            y = layers.BatchNormalization(name=f"bn{i}")(y)
        elif norm == "layer":
            y = layers.LayerNormalization(name=f"ln{i}")(y)
        y = layers.Activation(activation)(y)
        x = x + y if residual else y
    return keras.Model(inputs, layers.Dense(1, name="out")(x))


def _sigmoid_small_init(depth=10):
    init = keras.initializers.RandomNormal(stddev=0.05)
    inputs = layers.Input((20,))
    x = inputs
    for i in range(depth):
        x = layers.Dense(64, activation="sigmoid", kernel_initializer=init, name=f"s{i}")(x)
    return keras.Model(inputs, layers.Dense(1, name="out")(x))


class Gate(layers.Layer):
    """Multiplies its input by a non-trainable scalar (set to 0 to cut a branch)."""

    def build(self, shape):
        self.gate = self.add_weight(shape=(), initializer="ones", trainable=False, name="gate")

    def call(self, x):
        return x * self.gate


def _gated_branch():
    inputs = layers.Input((20,))
    trunk = layers.Dense(64, activation="relu", name="trunk")(inputs)
    a = layers.Dense(32, activation="relu", name="branch_a")(trunk)
    b = layers.Dense(32, activation="relu", name="branch_b1")(trunk)
    b = layers.Dense(32, activation="relu", name="branch_b2")(b)
    b = Gate(name="gate")(b)
    merged = layers.Concatenate()([a, b])
    return keras.Model(inputs, layers.Dense(1, name="out")(merged))


def _frozen():
    inputs = layers.Input((20,))
    x = layers.Dense(64, activation="relu", name="frozen_1", trainable=False)(inputs)
    x = layers.Dense(64, activation="relu", name="frozen_2", trainable=False)(x)
    x = layers.Dense(64, activation="relu", name="tuned")(x)
    unused = layers.Dense(8, name="unused_head")(x)  # trainable, never in the loss: no gradient
    return keras.Model(inputs, [layers.Dense(1, name="out")(x), unused])


def _big_vocab(vocab=20000):
    tokens = layers.Input((30,), dtype="int32")
    x = layers.Embedding(vocab, 32, name="embed")(tokens)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dense(32, activation="relu", name="hidden")(x)
    return keras.Model(tokens, layers.Dense(3, name="out")(x))


def _transformer(vocab=2000, length=24, width=32, blocks=2):
    tokens = layers.Input((length,), dtype="int32")
    x = layers.Embedding(vocab, width, name="tokens")(tokens)
    x = x + layers.Embedding(length, width, name="positions")(tf.range(length))
    for i in range(blocks):
        attended = layers.MultiHeadAttention(num_heads=2, key_dim=16, name=f"attention_{i}")(x, x)
        x = layers.LayerNormalization(name=f"ln_a{i}")(x + attended)
        ff = layers.Dense(width, name=f"ff_out{i}")(layers.Dense(64, activation="gelu", name=f"ff_in{i}")(x))
        x = layers.LayerNormalization(name=f"ln_f{i}")(x + ff)
    return keras.Model(tokens, layers.Dense(4, name="out")(layers.GlobalAveragePooling1D()(x)))


def _lstm(depth=2):
    inputs = layers.Input((20, 8))
    x = inputs
    for i in range(depth):
        x = layers.LSTM(32, return_sequences=i < depth - 1, name=f"lstm_{i}")(x)
    return keras.Model(inputs, layers.Dense(2, name="out")(x))


def _gru():
    return keras.Sequential([layers.Input((20, 8)), layers.GRU(32, name="gru"), layers.Dense(2, name="out")])


def _cnn():
    return keras.Sequential([layers.Input((16, 16, 1)), layers.Conv2D(8, 3, activation="relu", name="c1"),
                             layers.Conv2D(16, 3, strides=2, activation="relu", name="c2"),
                             layers.GlobalAveragePooling2D(), layers.Dense(10, name="out")])


def _two_heads():
    """A shared trunk with a second head whose labels exist on ~10% of the batches."""
    inputs = layers.Input((20,))
    x = layers.Dense(64, activation="relu", name="trunk")(inputs)
    return keras.Model(inputs, [layers.Dense(1, name="main_head")(x), layers.Dense(1, name="rare_head")(x)])


def _dying_relu(width=8):
    inputs = layers.Input((20,))
    x = inputs
    for i in range(4):  # narrow ReLU layers die easily (Lu et al. 2019, "Dying ReLU and initialization")
        x = layers.Dense(width, activation="relu", name=f"r{i}")(x)
    return keras.Model(inputs, layers.Dense(1, name="out")(x))


def _data(kind, rng, size=4096):
    if kind == "regression":
        x = rng.normal(size=(size, 20)).astype("float32")
        y = np.sin(x @ rng.normal(size=(20, 1))) + 0.5 * (x[:, :1] * x[:, 1:2]) + 0.1 * rng.normal(size=(size, 1))
        return x, y.astype("float32")
    if kind == "sequence":
        x = rng.normal(size=(size, 20, 8)).astype("float32")
        return x, (x[:, :10, 0].sum(1) + x[:, 10:, 1].sum(1) > 0).astype("int64")
    if kind == "image":
        labels = rng.integers(0, 10, size)
        patterns = rng.normal(size=(10, 16, 16, 1))
        return (patterns[labels] + 2.0 * rng.normal(size=(size, 16, 16, 1))).astype("float32"), labels
    if kind == "zipf":  # word-like token frequencies: most rows untouched in a batch
        x = np.minimum(rng.zipf(1.3, size=(size, 30)), 20000) - 1
        return x.astype("int32"), np.minimum((x < 20).sum(1), 2)
    x = rng.integers(0, 2000, size=(size, 24))  # tokens
    return x.astype("int32"), (x[:, :12] < 500).sum(1) % 4


def _opt(name, lr):
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    if name == "plain_sgd":
        return keras.optimizers.SGD(lr)
    return {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
            "rmsprop": keras.optimizers.RMSprop}[name](lr)


# name: (builder, data kind, loss, [(optimizer, lr)], healthy)
HEALTHY = {
    "deep_relu_12": (lambda: _deep(), "regression", "mse", [("adam", 1e-3), ("sgd", 0.01)]),
    "deep_relu_12_he": (lambda: _deep(init="he_normal"), "regression", "mse", [("sgd", 0.003)]),
    "deep_relu_12_batchnorm": (lambda: _deep(norm="batch"), "regression", "mse", [("adam", 1e-3), ("sgd", 0.01)]),
    "deep_relu_12_layernorm": (lambda: _deep(norm="layer"), "regression", "mse", [("adam", 1e-3)]),
    "deep_gelu_12": (lambda: _deep(activation="gelu"), "regression", "mse", [("adam", 1e-3), ("sgd", 0.01)]),
    "deep_gelu_16_residual_ln": (lambda: _deep(16 * 4, 16, "gelu", "layer", residual=True), "regression", "mse",
                                 [("adamw", 1e-3)]),
    "frozen_and_unused": (_frozen, "regression", "mse", [("adam", 1e-3)]),
    "big_vocab_embedding": (_big_vocab, "zipf", "xent", [("adam", 3e-3), ("sgd", 0.1)]),
    "transformer_2_blocks": (_transformer, "tokens", "xent", [("adamw", 1e-3), ("adam", 3e-4)]),
    "lstm_2": (_lstm, "sequence", "xent", [("adam", 3e-3), ("rmsprop", 1e-3)]),
    "gru": (_gru, "sequence", "xent", [("rmsprop", 1e-3)]),
    "small_cnn": (_cnn, "image", "xent", [("adam", 1e-3), ("sgd", 0.01)]),
    "rare_second_head": (_two_heads, "regression", "two_heads", [("adam", 1e-3)]),
}

EVENT_STEP = 200  # the constructed problems start here (vanishing: from step 1)
# name: (builder, data kind, loss, (optimizer, lr), event, {kind: layers that must be flagged})
CONSTRUCTED = {
    "sigmoid_10_small_init": (_sigmoid_small_init, "regression", "mse", ("sgd", 0.1), None,
                              {"vanishing": ["s0", "s1", "s2", "s3", "s4"]}),
    "sigmoid_10_small_init_adam": (_sigmoid_small_init, "regression", "mse", ("adam", 1e-3), None,
                                   {"vanishing": ["s0", "s1", "s2", "s3", "s4"]}),
    "branch_gated_off": (_gated_branch, "regression", "mse", ("adam", 1e-3), "gate",
                         {"dead": ["branch_b1", "branch_b2"]}),
    # The learning rate jumps 0.01 -> 3 for 3 steps: in some seeds every ReLU of a layer dies
    # (then the layers up to it get exactly zero gradient), in others none. Expected: the
    # layers whose gradient is zero from some step to the end (`truly_dead`).
    "dying_relu_lr_jump": (_dying_relu, "regression", "mse", ("plain_sgd", 0.01), "lr_jump", None),
}


def record(builder, kind, loss_name, optimizer, seed, event=None, steps=STEPS):
    """`(paths, norms [steps, layers], sizes, sparse)` of one run."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = _data(kind, rng)
    model = builder()
    opt = _opt(*optimizer)
    paths, layer_of = stats.layer_paths(model)
    variables = model.trainable_variables
    ids = [layer_of[id(v)] for v in variables]
    sizes = vanishing.layer_sizes(variables, layer_of, len(paths))
    sparse = np.zeros(len(paths), bool)
    mse = keras.losses.MeanSquaredError()
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_of(outputs, targets, mask):
        if loss_name == "mse":
            return mse(targets, outputs[0] if isinstance(outputs, (list, tuple)) else outputs)
        if loss_name == "two_heads":
            return mse(targets, outputs[0]) + mask * mse(targets, outputs[1])
        return xent(targets, outputs)

    @tf.function
    def step(inputs, targets, mask):
        with tf.GradientTape() as tape:
            loss = loss_of(model(inputs, training=True), targets, mask)
        grads = tape.gradient(loss, variables)
        sq = [tf.zeros([]) if g is None else stats.squared_norm(g) for g in grads]
        applied = [(g, v) for g, v in zip(grads, variables) if g is not None]
        opt.apply_gradients(applied)
        layer_sq = stats.sum_by_layer(tf.stack(sq), ids, len(paths))
        return tf.sqrt(layer_sq), [isinstance(g, tf.IndexedSlices) for g in grads]

    norms = np.empty((steps, len(paths)))
    for t in range(steps):
        if t == EVENT_STEP and event == "gate":
            model.get_layer("gate").gate.assign(0.0)
        if event == "lr_jump" and t in (EVENT_STEP, EVENT_STEP + 3):
            opt.learning_rate.assign(3.0 if t == EVENT_STEP else 0.01)
        batch = rng.integers(0, len(x), BATCH)
        mask = float(rng.random() < 0.1)
        out, is_sparse = step(tf.constant(x[batch]), tf.constant(y[batch]), tf.constant(mask))
        norms[t] = out.numpy()
        if t == 0:
            sparse = np.array([any(s for s, i in zip(is_sparse, ids) if i == layer) for layer in range(len(paths))])
    return paths, norms, sizes, sparse


def flagged(norms, sizes, sparse, config):
    """`{kind: {layer index: first onset step (1-based)}}` of a replay."""
    _, events = vanishing.scan(vanishing.init(norms.shape[1]), norms, sizes, sparse, config)
    found = {kind: {} for kind in vanishing.KINDS}
    for event in events:
        if event.onset:
            for layer in event.layers:
                found[event.kind].setdefault(layer, event.row + 1)
    return found


def persistent_gap(norms, sizes, sparse, window):
    """Most negative (over layers) value of the max depth gap over any `window` consecutive steps."""
    usable = np.isfinite(norms) & (norms > 0) & ~np.asarray(sparse)[None, :]
    gaps = vanishing.depth_gaps(norms, sizes, usable)
    worst = np.inf
    for layer in range(gaps.shape[1]):
        column = gaps[:, layer]
        column = column[~np.isnan(column)]
        if len(column) < window:
            continue
        rolling = np.lib.stride_tricks.sliding_window_view(column, window).max(axis=1)
        worst = min(worst, rolling.min())
    return worst


def dead_margin(norms, config):
    """Largest (zero run / zero run required to be dead) over a run's layers and steps (< 1: quiet)."""
    worst = 0.0
    for column in norms.T:
        seen = zero_steps = run = 0
        for value in column:
            if not np.isfinite(value):
                continue
            if value == 0 and seen:
                run += 1
                required = vanishing.required_zero_run(zero_steps, seen, config)
                worst = max(worst, run / float(required))
            elif value > 0:
                zero_steps, run, seen = zero_steps + run, 0, seen + 1
    return worst


def truly_dead(paths, norms, tail):
    """Layers whose gradient is exactly zero over at least the last `tail` steps (and non-zero before)."""
    dead = []
    for i, path in enumerate(paths):
        column = norms[:, i]
        if (column[-tail:] == 0).all() and (column > 0).any():
            dead.append(path)
    return dead


SEEDS = (0, 1, 2)


def collect(cache=None):
    """`[(name, label, healthy, expected, recording)]`; recordings cached in `cache` (a .npy)."""
    import os
    import time

    if cache and os.path.exists(cache):
        return list(np.load(cache, allow_pickle=True))
    runs = []
    plan = [(name, spec[0], spec[1], spec[2], opt, None, None) for name, spec in HEALTHY.items() for opt in spec[3]]
    plan += [(name, b, k, loss, opt, event, expected) for name, (b, k, loss, opt, event, expected) in CONSTRUCTED.items()]
    for name, build, kind, loss, opt, event, expected in plan:
        for seed in SEEDS if name in HEALTHY else SEEDS + (3,):
            start = time.time()
            recording = record(build, kind, loss, opt, seed, event)
            label = f"{name} {opt[0]} lr={opt[1]:g} seed={seed}"
            runs.append((name, label, name in HEALTHY, expected, recording))
            print(f"  trained {label:<50} {time.time() - start:5.1f}s", flush=True)
    if cache:
        np.save(cache, np.array(runs, dtype=object), allow_pickle=True)
    return runs


def evaluate(runs, config):
    """Prints one row per run; returns (false alarms, expected flags missed)."""
    alarms = missed = 0
    print(f"\n{config}\n")
    print(f"{'run':<52} {'layers':>6} {'gap':>6} {'dead':>5} {'flagged (layer@step)'}")
    for name, label, healthy, expected, (paths, norms, sizes, sparse) in runs:
        found = flagged(norms, sizes, sparse, config)
        gap = persistent_gap(norms, sizes, sparse, config.window)
        margin = dead_margin(norms, config)
        text = "; ".join(f"{kind} " + ", ".join(f"{paths[i]}@{step}" for i, step in sorted(layers.items()))
                         for kind, layers in found.items() if layers) or "-"
        if healthy:
            alarms += sum(len(layers) for layers in found.values())
        else:
            if expected is None:  # dying ReLUs: the layers that really died
                expected = {"dead": truly_dead(paths, norms, config.dead_steps + 20)}
            for kind, names in expected.items():
                got = {paths[i] for i in found[kind]}
                missed += len(set(names) - got)
                wrong = got - set(names) if kind == "dead" else set()
                alarms += len(wrong)
            text += f"   expected {expected}"
        print(f"{label:<52} {len(paths):6d} {gap:6.2f} {margin:5.2f} {text}")
    print(f"\nhealthy runs: {sum(r[2] for r in runs)}, constructed: {sum(not r[2] for r in runs)}; "
          f"false alarms: {alarms}; expected layers missed: {missed}")
    return alarms, missed

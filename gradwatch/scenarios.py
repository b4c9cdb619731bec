"""Reproducible "exploding gradients" scenario: a ReLU RNN on the adding problem.

The adding problem (Hochreiter & Schmidhuber 1997; Pascanu, Mikolov & Bengio
2013): each input is a sequence of (value, marker) pairs, values U(0, 1),
exactly two markers set to 1 (one in each half); the target is the sum of the
two marked values. Predicting the mean (1.0) gives MSE Var(a + b) = 2/12 = 1/6
(`BASELINE_MSE`).

The model is an IRNN-style SimpleRNN (ReLU, recurrent matrix initialised to
0.9 * identity, small input weights; Le, Jaitly & Hinton 2015). It starts
contractive and calm; to remember the marked values SGD must grow the recurrent
matrix towards an eigenvalue of 1, and when it overshoots, the hidden state and
the gradient grow like lambda**seq_len: the global gradient norm jumps by one to
four orders of magnitude in a step or two, typically within the first 1-4
epochs. Plain SGD+momentum then throws the ReLU units into a dead or exploding
state and ends near (or above) the baseline, while the same optimizer with
`global_clipnorm=1.0` learns the task. Data come from a seeded numpy RNG and
initialisers are seeded; nothing is downloaded.
"""

import numpy as np

SCENARIO = {
    "seq_len": 20,
    "train_size": 4096,
    "val_size": 512,
    "epochs": 8,
    "batch_size": 32,
    "learning_rate": 0.015,
    "momentum": 0.9,
    "units": 32,
    "clip": {"global_clipnorm": 1.0},
}

BASELINE_MSE = 1.0 / 6.0  # MSE of always predicting E[y] = 1


def adding_problem(num_samples, seq_len, seed):
    """Returns `(x, y)`: x float32 [n, seq_len, 2] of (value, marker), y float32 [n, 1]."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 1.0, size=(num_samples, seq_len))
    half = seq_len // 2
    first = rng.integers(0, half, size=num_samples)
    second = rng.integers(half, seq_len, size=num_samples)
    rows = np.arange(num_samples)
    markers = np.zeros((num_samples, seq_len))
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values[rows, first] + values[rows, second])[:, None].astype(np.float32)
    return x, y


def scenario_data(seed):
    """`(x_train, y_train, x_val, y_val)` at the scenario's sizes (val uses seed + 10_000)."""
    s = SCENARIO
    return (*adding_problem(s["train_size"], s["seq_len"], seed),
            *adding_problem(s["val_size"], s["seq_len"], seed + 10_000))


def default_optimizer(clip=None):
    """SGD+momentum at the scenario's rate, which explodes without clipping.

    `clip`: keyword arguments for the optimizer, e.g. `SCENARIO["clip"]` or
    `{"clipnorm": 1.0}`; None trains plainly.
    """
    import keras

    return keras.optimizers.SGD(learning_rate=SCENARIO["learning_rate"],
                                momentum=SCENARIO["momentum"], **(clip or {}))


def build_adding_model(seed, optimizer=None):
    """Compiled SimpleRNN(relu, units) -> Dense(1) regressor, loss "mse", seeded."""
    import keras

    init = keras.initializers
    model = keras.Sequential([
        keras.Input((None, 2)),
        keras.layers.SimpleRNN(
            SCENARIO["units"], activation="relu",
            kernel_initializer=init.RandomNormal(stddev=0.1, seed=seed),
            recurrent_initializer=init.Identity(gain=0.9)),
        keras.layers.Dense(1, kernel_initializer=init.GlorotUniform(seed=seed + 1),
                           bias_initializer=init.Constant(1.0)),  # E[y]: calm first steps
    ])
    model.compile(optimizer=optimizer or default_optimizer(), loss="mse")
    return model


def train_with_grad_norms(model, x, y, epochs, batch_size, seed,
                          clip_from_spike=None, spike_factor=10.0, warmup=5):
    """Custom training loop recording the pre-clip global gradient norm per step.

    Batches are shuffled with `np.random.default_rng(seed)`. The first spike is
    the first step (after `warmup` steps) whose norm is non-finite or exceeds
    `spike_factor` times the median of all earlier norms. With
    `clip_from_spike=c`, gradients are clipped to global norm `c` from that
    step on, the spiking step included (what `global_clipnorm=c` would do).
    Returns `(norms, losses, first_spike_step or None)`.
    """
    import tensorflow as tf

    variables = model.trainable_variables
    optimizer = model.optimizer

    @tf.function
    def gradients(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        grads = tape.gradient(loss, variables)
        return loss, grads, tf.linalg.global_norm(grads)

    @tf.function
    def apply(grads, norm, clip_to):  # clip_to <= 0: no clipping
        grads = tf.cond(clip_to > 0,
                        lambda: tf.clip_by_global_norm(grads, clip_to, use_norm=norm)[0],
                        lambda: list(grads))
        optimizer.apply_gradients(zip(grads, variables))

    rng = np.random.default_rng(seed)
    norms, losses, spike = [], [], None
    n = len(x)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            loss, grads, norm = gradients(x[idx], y[idx])
            norm = float(norm)
            if spike is None and len(norms) >= warmup and not (
                    norm <= spike_factor * np.median(norms)):
                spike = len(norms)
            clip = clip_from_spike if (clip_from_spike and spike is not None) else 0.0
            apply(grads, tf.constant(norm), tf.constant(clip, tf.float32))
            norms.append(norm)
            losses.append(float(loss))
    return np.array(norms), np.array(losses), spike


def val_mse(model, x, y):
    pred = model.predict(x, batch_size=len(x), verbose=0)
    return float(np.mean((pred - y) ** 2))

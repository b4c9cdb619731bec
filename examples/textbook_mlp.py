"""The textbook exploding-gradient case: a regression MLP trained with SGD.

Targets with a large spread and SGD with momentum make the first updates
explode: the loss goes to NaN within an epoch. gradwatch shows where and when;
`clipvalue` or `clipnorm` fix it. Run:

    python examples/textbook_mlp.py
    tensorboard --logdir gradwatch_logs/textbook_mlp
"""

import argparse
import os

import keras
import numpy as np

import gradwatch


def make_data(seed=1, n=1000, features=20):
    """Linear regression data with targets in the hundreds (no scaling)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = (x @ rng.uniform(10, 100, size=(features, 1))).astype("float32")
    return x, y


def build(optimizer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((20,)),
        keras.layers.Dense(25, activation="relu", kernel_initializer="he_uniform", name="hidden"),
        keras.layers.Dense(1, name="output"),
    ])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def train(name, optimizer, x, y, logdir, epochs):
    model = build(optimizer)
    monitor = gradwatch.GradientMonitor(os.path.join(logdir, name), update_freq=10, verbose=0)
    history = model.fit(x[:800], y[:800], validation_data=(x[800:], y[800:]), batch_size=32,
                        epochs=epochs, verbose=0, callbacks=[monitor])
    first = monitor.explosions[0] if monitor.explosions else None
    return history.history["val_loss"][-1], len(monitor.explosions), first


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="gradwatch_logs/textbook_mlp")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    x, y = make_data()
    runs = {
        "plain SGD": keras.optimizers.SGD(0.01, momentum=0.9),
        "SGD clipvalue=5": keras.optimizers.SGD(0.01, momentum=0.9, clipvalue=5.0),
        "SGD clipnorm=1": keras.optimizers.SGD(0.01, momentum=0.9, clipnorm=1.0),
    }
    print(f"{'run':<18} {'val MSE':>12} {'explosions':>11}  first explosion")
    for name, optimizer in runs.items():
        val_loss, count, first = train(name.replace(" ", "_").replace("=", ""), optimizer, x, y,
                                       args.logdir, args.epochs)
        where = f"step {first.step}, top layer {first.layers[0][0]}" if first else "-"
        print(f"{name:<18} {val_loss:>12.4g} {count:>11}  {where}")
    print(f"\ntensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()

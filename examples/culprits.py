"""Which rows made the gradient explode: a table with a few corrupted rows.

The data is embedded here (600 rows of 6 features, made from a fixed seed,
targets from a known formula); three rows are corrupted as real data gets
corrupted: two targets off by a factor of 1000 (a unit error), one NaN feature.
`fit` shuffles. gradwatch keeps each exploding step's batch, ranks its samples
and names the culprits in the alert; `gradwatch.find_culprits` finds them back
in the arrays; the recipe drops them and trains again, without an explosion.
Run:

    python examples/culprits.py
    gradwatch report gradwatch_logs/culprits
"""

import argparse
import os

import keras
import numpy as np

import gradwatch

CORRUPTED_TARGETS = (57, 311)  # targets x1000
NAN_ROW = 480  # a NaN feature


def make_data(n=600, seed=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (x @ np.array([[1.5], [-2.0], [0.5], [1.0], [0.0], [0.3]]) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    y[list(CORRUPTED_TARGETS)] *= 1000.0
    x[NAN_ROW, 2] = np.nan
    return x, y


def build():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(1e-3), "mse")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="gradwatch_logs/culprits")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(3)
    x, y = make_data()
    model = build()
    # skip_nonfinite: a NaN update would make every later step NaN (and hide the other rows).
    monitor = gradwatch.GradientMonitor(os.path.join(args.logdir, "corrupted"), update_freq=10, culprits="rank",
                                        skip_nonfinite=True)
    model.fit(x, y, batch_size=32, epochs=args.epochs, shuffle=True, verbose=0, callbacks=[monitor])

    for explosion in monitor.explosions[:6]:
        top = explosion.culprits[0] if explosion.culprits else None
        print(f"step {explosion.step}: global norm {explosion.global_norm:.3g}; top sample of the batch: "
              + (f"#{top.index} (loss {top.loss:.3g}, {top.share:.0%} of the gradient)" if top else "-"))
    found = gradwatch.find_culprits(monitor.explosions, x, y)
    print(f"rows found: {found.tolist()} (corrupted: {sorted(CORRUPTED_TARGETS + (NAN_ROW,))})")
    for row in found:
        print(f"  row {row}: x = [{', '.join(f'{v:.2f}' for v in x[row])}], y = {float(y[row, 0]):.4g}")

    # The recipe: drop the rows found, train again.
    keep = np.setdiff1d(np.arange(len(x)), found)
    keras.utils.set_random_seed(3)
    clean = gradwatch.GradientMonitor(os.path.join(args.logdir, "cleaned"), update_freq=10, verbose=0)
    history = build().fit(x[keep], y[keep], batch_size=32, epochs=args.epochs, shuffle=True, verbose=0,
                          callbacks=[clean])
    print(f"trained again without them: {len(clean.explosions)} explosions, "
          f"final loss {history.history['loss'][-1]:.3g}")


if __name__ == "__main__":
    main()

"""The textbook procedure as one call: clip by value and by norm at several
thresholds, keep what does best on validation (`gradwatch.ClippingSweep`).

A GRU regressor learns a smooth function of 20-step sequences, but 0.5% of its
training targets are corrupted (x60), a common cause of exploding gradients:
under plain SGD+momentum it learns next to nothing. The sweep measures the
healthy gradient sizes in a short probe run, derives thresholds for
`clipvalue`, `clipnorm` and `global_clipnorm` from them, trains one trial
without clipping and one per mode and threshold (a KerasTuner grid search),
and prints the table, best first. Data are made here; needs
`pip install "gradwatch[sweep]"`.

    python examples/clipping_sweep.py                    # about 1.5 minutes on 2 cores
    python examples/clipping_sweep.py --modes clipnorm   # one mode: 5 trials instead of 13
    tensorboard --logdir logs/clipping_sweep             # HParams and gradwatch tabs
    gradwatch report logs/clipping_sweep                 # the table again, in a terminal

Running it again on the same folder resumes the sweep (here: trains nothing).
"""

import argparse

import keras
import numpy as np

import gradwatch

SEQ_LEN, FEATURES = 20, 4


def corrupted_sequences(seed, train_size=2048, val_size=512, corrupted=0.005, scale=60.0):
    """`(x, y, x_val, y_val)`: y = 3 * mean_t tanh(x_t . w); a fraction
    `corrupted` of the training targets multiplied by `scale`; clean validation."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FEATURES,)).astype("float32")

    def sample(count):
        x = rng.normal(size=(count, SEQ_LEN, FEATURES)).astype("float32")
        return x, (3.0 * np.tanh(x @ w).mean(axis=1, keepdims=True)).astype("float32")

    x, y = sample(train_size)
    x_val, y_val = sample(val_size)
    y[rng.choice(train_size, max(1, int(corrupted * train_size)), replace=False)] *= scale
    return x, y, x_val, y_val


def build_model():
    """A new compiled GRU regressor (the sweep seeds before each call)."""
    model = keras.Sequential([keras.Input((None, FEATURES)), keras.layers.GRU(32, name="gru"),
                              keras.layers.Dense(1, name="head")])
    model.compile(keras.optimizers.SGD(learning_rate=0.02, momentum=0.9), loss="mse")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="logs/clipping_sweep")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=["clipvalue", "clipnorm", "global_clipnorm"],
                        help="clipping modes to try (4 thresholds each, plus one trial without clipping)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    args = parser.parse_args(argv)

    x, y, x_val, y_val = corrupted_sequences(args.seed, train_size=args.train_size)
    sweep = gradwatch.ClippingSweep(build_model, log_dir=args.logdir, objective="val_loss",
                                    modes=args.modes, seed=args.seed, overwrite=args.overwrite)
    results = sweep.search(x, y, validation_data=(x_val, y_val), epochs=args.epochs, batch_size=32,
                           verbose=0)
    print(f"(predicting the mean scores val_loss {float(y_val.var()):.3f})")
    best = results.best
    if best is not None:
        setting = "" if best.mode is None else f"model.optimizer.{best.mode} = {best.threshold:g}; "
        print(f"To train the best again: keras.utils.set_random_seed({args.seed}); "
              f"model = build_model(); {setting}model.fit(...) with the same arguments.")
    print(f"tensorboard --logdir {args.logdir}    # HParams tab: every trial; gradwatch tab: norms")
    return results


if __name__ == "__main__":
    main()

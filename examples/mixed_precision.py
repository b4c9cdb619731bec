"""Mixed precision (`mixed_float16`): norms are of the unscaled gradient.

Under mixed precision Keras wraps the optimizer in a `LossScaleOptimizer`,
which scales the loss up, unscales the gradient, and skips steps whose scaled
gradient overflowed float16 (halving the scale). gradwatch reports the
unscaled norms, counts overflow-skipped steps in `grad_norm/overflow` (they are
not explosions), and under `auto_clip` sets the clipping on the inner optimizer.

    python examples/mixed_precision.py
"""

import argparse
import os

import keras
import numpy as np

import gradwatch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="gradwatch_logs/mixed_precision")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2048, 16)).astype("float32")
        y = np.sin(x[:, :1] * 2.0) + 0.1 * rng.normal(size=(2048, 1)).astype("float32")
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu", name="dense_1"),
                                  keras.layers.Dense(64, activation="relu", name="dense_2"),
                                  keras.layers.Dense(1, dtype="float32", name="out")])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
        print("optimizer:", type(model.optimizer).__name__,
              "with initial loss scale", float(model.optimizer.initial_scale))
        monitor = gradwatch.GradientMonitor(os.path.join(args.logdir, "run"), auto_clip="clipnorm",
                                            clip_threshold=1.0)
        model.fit(x, y, batch_size=32, epochs=args.epochs, verbose=0, callbacks=[monitor])
        print("final loss scale:", float(model.optimizer.dynamic_scale.numpy()))
        print("explosions:", len(monitor.explosions),
              "| inner optimizer clipnorm:", model.optimizer.inner_optimizer.clipnorm)
        print(f"\ntensorboard --logdir {args.logdir}")
    finally:
        keras.config.set_dtype_policy("float32")


if __name__ == "__main__":
    main()

"""A Transformer-style model monitored with the adaptive detector.

A small encoder block (token + position embeddings, multi-head attention,
layer norms, a feed-forward block) learns to predict the sum of a token
sequence. Per-layer norms show each block separately (`attention`,
`ffn_in`, `norm_1`, ...); with healthy training the adaptive detector stays
quiet, and a corrupted batch (targets x1000 at step 100) is flagged at its step.
With `auto_clip="global_clipnorm"` and `clip_threshold="auto"`, that step and
every later one are clipped to the 25th percentile of the recent healthy
norms (it follows the run), so the bad batch cannot throw the model off (run
with `--no-clip` to see the damage).

    python examples/transformer.py
"""

import argparse
import os

import keras
import numpy as np

import gradwatch

VOCAB, LENGTH, WIDTH = 50, 16, 32


def make_data(seed=0, n=4096, corrupt_batch=None, batch_size=32):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(n, LENGTH)).astype("int32")
    targets = (tokens.sum(axis=1, keepdims=True) / (VOCAB * LENGTH / 2)).astype("float32")
    if corrupt_batch is not None:
        targets[corrupt_batch * batch_size:(corrupt_batch + 1) * batch_size] *= 1000.0
    return tokens, targets


def build():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((LENGTH,), dtype="int32")
    embedded = keras.layers.Embedding(VOCAB, WIDTH, name="tokens")(tokens)
    positions = keras.layers.Embedding(LENGTH, WIDTH, name="positions")(keras.ops.arange(LENGTH))
    x = embedded + positions
    attended = keras.layers.MultiHeadAttention(4, WIDTH // 4, name="attention")(x, x)
    x = keras.layers.LayerNormalization(name="norm_1")(x + attended)
    hidden = keras.layers.Dense(64, activation="gelu", name="ffn_in")(x)
    x = keras.layers.LayerNormalization(name="norm_2")(x + keras.layers.Dense(WIDTH, name="ffn_out")(hidden))
    pooled = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(tokens, keras.layers.Dense(1, name="head")(pooled))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="mse")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="gradwatch_logs/transformer")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-clip", action="store_true", help="monitor only")
    args = parser.parse_args(argv)
    x, y = make_data(corrupt_batch=99)  # step 100 of the first epoch
    model = build()
    auto_clip = None if args.no_clip else "global_clipnorm"
    monitor = gradwatch.GradientMonitor(os.path.join(args.logdir, "run"), auto_clip=auto_clip,
                                        clip_threshold="auto")
    model.fit(x, y, batch_size=32, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[monitor])
    print("layers:", ", ".join(monitor.layer_paths))
    print("explosions:", [(e.step, e.action) for e in monitor.explosions][:10])
    print("loss on clean samples:", round(float(model.evaluate(x[:512], y[:512], verbose=0)), 4))
    print(f"\ntensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()

"""Cost of finer rows (`GradientMonitor(sublayers=...)`, issue 21) on keras-hub's GPT-2.

A GPT-2 backbone built from a small config (nothing downloaded; default 4
transformer layers, hidden 64, sequence 32, batch 16) with a dense head,
trained with Adam. Four configurations, each its own model instance with the
same initial weights and data: plain `fit()`, gradwatch with the default rows
(`sublayers=0`), `sublayers=1` (attention, feed-forward layers and norms of each
block apart) and `sublayers=2` (also query, key, value, attention output).
Rounds run every configuration once, in a fresh random order, for `--steps`
steps with one `fit()` each (the monitor keeps its traced step between fits,
so only the first round traces; it is dropped as warm-up). Per round the ratio
of a configuration is its time per step over plain's; the table gives the
median ratio and median ms/step over the measured rounds, and the rows
(layers) each configuration reports.

    python benchmarks/finer_rows.py               # ~3 min on 2 shared cores
    python benchmarks/finer_rows.py --layers 12 --rounds 5
"""

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, markdown_table, median, quiet_tensorflow  # noqa: E402

quiet_tensorflow()


class StepTimer:
    """Times `fit()` from the first step's start to the last step's end (callbacks included)."""

    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(inner, batch, logs=None):
                if batch == 0:
                    self.start = time.perf_counter()

            def on_train_end(inner, logs=None):
                self.seconds = time.perf_counter() - self.start

        self.callback = Timer()


def build(args, seed=0):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=args.vocabulary, num_layers=args.layers, num_heads=4, hidden_dim=args.hidden,
        intermediate_dim=2 * args.hidden, max_sequence_length=args.sequence, dropout=0.0)
    inputs = {"token_ids": keras.Input((args.sequence,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((args.sequence,), dtype="int32", name="padding_mask")}
    pooled = keras.layers.GlobalAveragePooling1D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(pooled))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def main(argv=None):
    import numpy as np

    import gradwatch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--sequence", type=int, default=32)
    parser.add_argument("--vocabulary", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = {"token_ids": rng.integers(0, args.vocabulary, size=(n, args.sequence)).astype("int32"),
         "padding_mask": np.ones((n, args.sequence), "int32")}
    y = rng.normal(size=(n, 1)).astype("float32")
    logdir = tempfile.mkdtemp(prefix="gw-finer-rows-")
    configs = {"plain": None, "sublayers=0 (default)": 0, "sublayers=1": 1, "sublayers=2": 2}
    runs = {}
    for name, sublayers in configs.items():
        monitor = None if sublayers is None else gradwatch.GradientMonitor(
            os.path.join(logdir, str(sublayers)), sublayers=sublayers, verbose=0)
        runs[name] = (build(args), monitor, [])
    order = random.Random(0)
    for round_ in range(args.rounds + 1):
        names = list(configs)
        order.shuffle(names)
        for name in names:
            model, monitor, times = runs[name]
            timer = StepTimer()
            callbacks = [timer.callback] + ([monitor] if monitor else [])
            model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
            if round_:  # round 0 traces
                times.append(timer.seconds / args.steps)
    plain = runs["plain"][2]
    rows = []
    total_steps = (args.rounds + 1) * args.steps
    for name, (model, monitor, times) in runs.items():
        ratios = [t / p for t, p in zip(times, plain)]
        layers = "-" if monitor is None else str(len(monitor.layer_paths))
        written = "-" if monitor is None else f"{_folder_bytes(monitor.log_dir) / total_steps:.0f}"
        rows.append([name, layers, f"{1000 * median(times):.2f}", f"{median(ratios):.3f}", written])
    print(machine_info())
    print(f"GPT-2 backbone: {args.layers} transformer layers, hidden {args.hidden}, sequence {args.sequence}, "
          f"batch {args.batch}; {args.rounds} rounds of {args.steps} steps (after one warm-up round)\n")
    print(markdown_table(["configuration", "rows", "ms/step (median)", "time / plain (median)",
                          "log bytes/step"], rows))


def _folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


if __name__ == "__main__":
    main()

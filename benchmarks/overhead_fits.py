"""Step-time overhead of gradwatch, measured with one `fit(epochs=1)` per round.

Each configuration trains its own model (same architecture, weights and data)
in this one process. Every round runs one epoch of every configuration, in a
fresh random order; a configuration keeps its callbacks across rounds (a
reused `GradientMonitor` does not retrace). The first rounds (tracing) are
dropped; a cell is the median over rounds of (epoch wall time / plain's in
the same round); beside it, the ratio of the fastest epochs (the least
disturbed by other processes on a shared virtual machine). Simpler than
`overhead.py`'s threaded interleaving.

    python benchmarks/overhead_fits.py                    # MLP and LSTM, 12 rounds
    python benchmarks/overhead_fits.py --workloads mlp --rounds 20
"""

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradwatch  # noqa: E402

WORKLOADS = {  # name: (model builder, x shape, batch size, steps per epoch)
    "mlp": (lambda: [keras.Input((32,))] + [keras.layers.Dense(64, activation="relu") for _ in range(8)]
            + [keras.layers.Dense(1)], (32,), 256, 300),
    "lstm": (lambda: [keras.Input((50, 8)), keras.layers.LSTM(64, return_sequences=True),
                      keras.layers.LSTM(64), keras.layers.Dense(1)], (50, 8), 64, 40),
    "cnn": (lambda: [keras.Input((32, 32, 3)), keras.layers.Conv2D(16, 3, activation="relu"),
                     keras.layers.MaxPooling2D(), keras.layers.Conv2D(32, 3, activation="relu"),
                     keras.layers.MaxPooling2D(), keras.layers.Conv2D(64, 3, activation="relu"),
                     keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)], (32, 32, 3), 64, 60),
}


def configurations(logdir):
    def gw(name, **kwargs):
        return lambda: [gradwatch.GradientMonitor(os.path.join(logdir, name), verbose=0, **kwargs)]

    return {
        "plain": lambda: [],
        "gradwatch defaults (update_freq=100)": gw("defaults"),
        "gradwatch update_freq=1": gw("freq1", update_freq=1),
        "gradwatch auto_clip='clipnorm'": gw("clip", auto_clip="clipnorm"),
        "TensorBoard()": lambda: [keras.callbacks.TensorBoard(os.path.join(logdir, "tb"))],
        "TensorBoard(histogram_freq=1, update_freq='batch')": lambda: [keras.callbacks.TensorBoard(
            os.path.join(logdir, "tbh"), histogram_freq=1, update_freq="batch")],
    }


def run(workload, rounds, warmup, seed):
    build, shape, batch, steps = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch * steps,) + shape).astype("float32")
    y = rng.normal(size=(batch * steps, 1)).astype("float32")
    logdir = tempfile.mkdtemp(prefix="gw_overhead_")
    setups = {}
    for name, callbacks in configurations(logdir).items():
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(build())
        model.compile(optimizer="adam", loss="mse")
        setups[name] = (model, callbacks())
    times = {name: [] for name in setups}
    order = list(setups)
    for _ in range(warmup + rounds):
        random.Random(seed + len(times["plain"])).shuffle(order)
        for name in order:
            model, callbacks = setups[name]
            started = time.perf_counter()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)
            times[name].append((time.perf_counter() - started) / steps)
    plain = np.array(times["plain"][warmup:])
    best_plain = plain.min()
    return {name: (np.median(np.array(t[warmup:]) / plain), np.min(t[warmup:]) / best_plain,
                   np.min(t[warmup:]) * 1e3)
            for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="mlp,lstm")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.workloads.split(",")
    results = {w: run(w, args.rounds, args.warmup, args.seed) for w in names}
    print(f"{time.strftime('%Y-%m-%d')}; nproc {os.cpu_count()}; keras {keras.__version__}; "
          f"load average at end {os.getloadavg()[0]:.2f}; {args.rounds} rounds")
    print("cells: median of per-round ratios / ratio of fastest epochs (fastest ms/step)")
    print("| configuration | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for config in results[names[0]]:
        cells = [f"**{results[w][config][0]:.3f}** / {results[w][config][1]:.3f} "
                 f"({results[w][config][2]:.2f} ms/step)" for w in names]
        print(f"| {config} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

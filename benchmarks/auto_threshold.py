"""`clip_threshold="auto"` against fixed clipping thresholds, on every kind of trouble.

Kinds (issue 24), each trained plainly, with each of 4 fixed thresholds from
the start (Keras' own clipping) and with `GradientMonitor(auto_clip=MODE,
clip_threshold="auto")`, scored by the MSE on *clean* validation data (targets
standardised: 1.0 is predicting the mean):

* `chronic`: 0.5% of the training targets x60 from the first step;
* `midrun`: the same outliers, arriving only after half of the training
  (a second `fit` on corrupted data, the monitor carried over);
* `inputs`: 2% of the training inputs x50 (from the start);
* `lr_spike`: the learning rate x30 for 5 steps in the middle of the run;
* `diverge`: no bad data, a learning rate x`diverge_lr` too large from step 1;
* `healthy`: none of these: "auto" must never switch on, weights bit-identical.

Families (regression heads): `mlp` (4 x Dense(64, tanh)), `gru` (GRU(32)),
`cnn` (2 x Conv2D on 12x12 images), `attention` (a self-attention block with
LayerNorm); held out, never used to work the rule out (`--families resbn conv1d`): `resbn` (a residual
MLP with BatchNormalization) and `conv1d` (a 1-D CNN over the GRU's sequences); held out since
session 10 (`--families cnncls lstm deepmlp`): `cnncls` (a CNN classifier, softmax over 4 classes,
one-hot targets: the "MSE" is then the Brier score; "chronic" scales 0.5% of the one-hot rows
x60), `lstm` (LSTM(32) on the GRU's data) and `deepmlp` (8 x Dense(32, tanh) on the MLP's data);
optimizers `sgd` (SGD + momentum 0.9) and `adam`. Same initial
weights and batches for every run of a (kind, family, optimizer, seed).

    python benchmarks/auto_threshold.py --out r.jsonl --seeds 0 1          # the grid (2 workers)
    python benchmarks/auto_threshold.py --out r.jsonl --seeds 7 8 --label heldout
    python benchmarks/auto_threshold.py --table r.jsonl                     # markdown tables + summary

Results are appended as JSON lines (one per training run).
"""

import argparse
import collections
import gzip
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # this checkout's gradwatch
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

KINDS = ("chronic", "midrun", "inputs", "lr_spike", "diverge", "healthy")
FAMILIES = ("mlp", "gru", "cnn", "attention")
# Families the rule never saw, for held-out checks only (`--families resbn conv1d`): a residual MLP
# with BatchNormalization and ReLU (on the MLP's data), a 1-D CNN over the GRU's sequences.
# Session 10: a CNN classifier (softmax, one-hot targets), an LSTM regressor, an 8-layer tanh MLP.
HELD_OUT_FAMILIES = ("resbn", "conv1d", "cnncls", "lstm", "deepmlp")
OPTIMIZERS = ("sgd", "adam")
FIXED = {"clipnorm": (0.1, 0.3, 1.0, 3.0), "global_clipnorm": (0.1, 0.3, 1.0, 3.0),
         "clipvalue": (0.003, 0.01, 0.03, 0.1)}
LR = {"sgd": 0.02, "adam": 1e-3}
DIVERGE_LR = {"sgd": 10.0, "adam": 30.0}  # multipliers of LR for the `diverge` kind
TRAIN, VAL, BATCH, EPOCHS = 2048, 512, 32, 4


def data(kind, family, seed):
    """`(x, y, x_bad, y_bad, x_val, y_val)`: clean and corrupted training sets, clean validation."""
    if family == "cnncls":
        return _classifier_data(kind, seed)
    rng = np.random.default_rng(seed)
    n = TRAIN + VAL
    if family in ("mlp", "resbn", "deepmlp"):
        x = rng.normal(size=(n, 16))
        w = rng.normal(size=(16, 2)) / 4.0
        y = x @ w[:, :1] + 0.5 * np.tanh(x @ w[:, 1:]) + 0.3 * x[:, :1] * x[:, 1:2]
    elif family in ("gru", "attention", "conv1d", "lstm"):
        x = rng.normal(size=(n, 12, 4))
        w = rng.normal(size=(4,)) / 2.0
        y = x[:, -6:, 0].mean(1, keepdims=True) * 2.0 + np.tanh(x[:, -3:] @ w).mean(1)[:, None]
    else:  # cnn: the mean brightness of a blob
        x = rng.normal(size=(n, 12, 12, 1)) * 0.5
        centre = rng.integers(3, 9, size=(n, 2))
        amplitude = rng.normal(size=n)
        for i in range(n):
            x[i, centre[i, 0] - 2:centre[i, 0] + 2, centre[i, 1] - 2:centre[i, 1] + 2, 0] += amplitude[i]
        y = amplitude[:, None] + 0.1 * (centre[:, :1] - 6)
    y = (y - y.mean()) / y.std()
    return _split_and_corrupt(kind, x, y, rng)


def _classifier_data(kind, seed):
    """A blob on 12x12 noise; its class is the quadrant of its centre (one-hot, 4 classes)."""
    rng = np.random.default_rng(seed + 1000)
    n = TRAIN + VAL
    x = rng.normal(size=(n, 12, 12, 1)) * 0.5
    centre = rng.integers(2, 10, size=(n, 2))
    amplitude = 1.0 + rng.random(n)
    for i in range(n):
        x[i, centre[i, 0] - 2:centre[i, 0] + 2, centre[i, 1] - 2:centre[i, 1] + 2, 0] += amplitude[i]
    y = np.eye(4)[(centre[:, 0] >= 6) * 2 + (centre[:, 1] >= 6)]
    return _split_and_corrupt(kind, x, y, rng)


def _split_and_corrupt(kind, x, y, rng):
    x, y = x.astype("float32"), y.astype("float32")
    x_val, y_val, x, y = x[-VAL:], y[-VAL:], x[:-VAL], y[:-VAL]
    x_bad, y_bad = x.copy(), y.copy()
    if kind in ("chronic", "midrun"):
        bad = rng.choice(len(y), int(round(0.005 * len(y))), replace=False)
        y_bad[bad] *= 60.0
    elif kind == "inputs":
        bad = rng.choice(len(y), int(round(0.02 * len(y))), replace=False)
        x_bad[bad] *= 50.0
    return x, y, x_bad, y_bad, x_val, y_val


def build(family, seed, optimizer):
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if family == "mlp":
        net = keras.Sequential([keras.Input((16,))] + [layers.Dense(64, activation="tanh") for _ in range(4)]
                               + [layers.Dense(1)])
    elif family == "gru":
        net = keras.Sequential([keras.Input((12, 4)), layers.GRU(32), layers.Dense(1)])
    elif family == "lstm":
        net = keras.Sequential([keras.Input((12, 4)), layers.LSTM(32), layers.Dense(1)])
    elif family == "deepmlp":
        net = keras.Sequential([keras.Input((16,))] + [layers.Dense(32, activation="tanh") for _ in range(8)]
                               + [layers.Dense(1)])
    elif family == "cnncls":
        net = keras.Sequential([keras.Input((12, 12, 1)), layers.Conv2D(8, 3, activation="relu", padding="same"),
                                layers.MaxPooling2D(), layers.Conv2D(16, 3, activation="relu"),
                                layers.GlobalAveragePooling2D(), layers.Dense(4, activation="softmax")])
        net.compile(optimizer=optimizer, loss="categorical_crossentropy")
        return net
    elif family == "resbn":
        inputs = keras.Input((16,))
        h = layers.Dense(64)(inputs)
        for _ in range(3):
            h = h + layers.Dense(64)(layers.ReLU()(layers.BatchNormalization()(h)))
        net = keras.Model(inputs, layers.Dense(1)(layers.ReLU()(layers.BatchNormalization()(h))))
    elif family == "conv1d":
        net = keras.Sequential([keras.Input((12, 4)), layers.Conv1D(16, 3, activation="relu"),
                                layers.Conv1D(16, 3, activation="relu"), layers.GlobalAveragePooling1D(),
                                layers.Dense(1)])
    elif family == "cnn":
        net = keras.Sequential([keras.Input((12, 12, 1)), layers.Conv2D(8, 3, activation="relu"),
                                layers.Conv2D(16, 3, strides=2, activation="relu"),
                                layers.GlobalAveragePooling2D(), layers.Dense(1)])
    else:
        inputs = keras.Input((12, 4))
        h = layers.Dense(32)(inputs)
        h = layers.LayerNormalization()(h + layers.MultiHeadAttention(2, 16)(h, h))
        h = layers.LayerNormalization()(h + layers.Dense(32)(layers.Dense(64, activation="gelu")(h)))
        net = keras.Model(inputs, layers.Dense(1)(layers.GlobalAveragePooling1D()(h)))
    net.compile(optimizer=optimizer, loss="mse")
    return net


def learning_rate_spike(lr, start, length=5, factor=30.0):
    """A callback multiplying the learning rate by `factor` for steps [start, start + length)."""
    import keras

    class Spike(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0

        def on_train_batch_begin(self, batch, logs=None):
            self.step += 1
            spiking = start <= self.step < start + length
            self.model.optimizer.learning_rate.assign(lr * factor if spiking else lr)

    return Spike()


def train(job):
    """One training run; returns its JSON record."""
    import keras

    import gradwatch

    kind, family, opt_name, seed, run, mode = (job[k] for k in ("kind", "family", "optimizer", "seed", "run", "mode"))
    x, y, x_bad, y_bad, x_val, y_val = data(kind, family, seed)
    lr = LR[opt_name] * (DIVERGE_LR[opt_name] if kind == "diverge" else 1.0)
    clip = {mode: float(run.split("=")[1])} if run.startswith("fixed") else {}
    if opt_name == "sgd":
        optimizer = keras.optimizers.SGD(lr, momentum=0.9, **clip)
    else:
        optimizer = keras.optimizers.Adam(lr, **clip)
    net = build(family, seed, optimizer)
    callbacks, monitor = [keras.callbacks.TerminateOnNaN()], None
    if run.startswith("auto"):  # "auto", or variants: "auto+reset", "auto+noreset+p10", ...
        settings, extra, parts = {}, {}, run.split("+")[1:]  # the rule's defaults, but for these
        for part in parts:
            if part in ("reset", "noreset"):
                extra["reset_momentum"] = part == "reset"
            elif part.startswith("p"):
                settings["percentile"] = float(part[1:])
            elif part.startswith("rise"):
                settings["rise"] = float(part[4:])
            elif part.startswith("elev"):
                settings["elevation"] = float(part[4:])
            elif part.startswith("ov"):  # "ov0": the overshoot watch off; "ov0.5n8t0": gain, steps, level
                gain, steps, level = re.fullmatch(r"ov([\d.]+)(?:n(\d+))?(?:t(-?[\d.]+))?", part).groups()
                settings.update(overshoot_gain=float(gain), **({"overshoot_steps": int(steps)} if steps else {}),
                                **({"overshoot_level": float(level)} if level else {}))
            elif part.startswith("rb"):  # "rb32l0.3": rollback every 32 healthy steps, level 0.3
                steps, level = re.fullmatch(r"rb(\d+)(?:l([\d.]+))?", part).groups()
                settings.update(rollback_steps=int(steps), **({"rollback_level": float(level)} if level else {}))
            elif part.startswith("rj"):  # "rjoff": the first steps not judged again; "rj20": their ratio
                ratio = part[2:]
                settings["rejudge_ratio"] = float("inf") if ratio == "off" else float(ratio)
            elif part.startswith("up"):  # "up0": the update-size term off; "up0.5r0.02": gain, ratio
                gain, ratio = re.fullmatch(r"up([\d.]+)(?:r([\d.]+))?", part).groups()
                settings.update(update_gain=float(gain), **({"update_ratio": float(ratio)} if ratio else {}))
        monitor = gradwatch.GradientMonitor(tempfile.mkdtemp(prefix="gw_auto_"), auto_clip=mode,
                                            clip_threshold=gradwatch.AutoThreshold(**settings), verbose=0,
                                            vanishing=False, **extra)
        callbacks.append(monitor)
    steps_per_epoch = TRAIN // BATCH
    if kind == "lr_spike":
        callbacks.append(learning_rate_spike(lr, start=steps_per_epoch * EPOCHS // 2))
    start = time.time()
    fit = dict(batch_size=BATCH, verbose=0, callbacks=callbacks)
    if kind == "midrun":
        net.fit(x, y, epochs=EPOCHS // 2, **fit)
        if not net.stop_training:
            net.fit(x_bad, y_bad, epochs=EPOCHS // 2, **fit)
    else:
        net.fit(x_bad, y_bad, epochs=EPOCHS, **fit)
    pred = net.predict(x_val, batch_size=VAL, verbose=0)
    mse = float(np.mean((pred - y_val) ** 2))
    weights = np.concatenate([np.ravel(w) for w in net.get_weights()])
    switch = monitor.clipping_events[0] if monitor is not None and monitor.clipping_events else None
    return {**job, "val_mse": mse if np.isfinite(mse) else None,
            "alarms": len(monitor.explosions) if monitor is not None else None,
            "switch_step": switch and switch["step"], "switch_threshold": switch and switch["threshold"],
            "weights_digest": float(np.sum(weights.astype(np.float64) * np.arange(1, len(weights) + 1) % 9973))
            if np.all(np.isfinite(weights)) else None,
            "seconds": round(time.time() - start, 1)}


def jobs_for(kinds, families, optimizers, seeds, modes, runs):
    for kind, family, opt_name, seed in itertools.product(kinds, families, optimizers, seeds):
        base = dict(kind=kind, family=family, optimizer=opt_name, seed=seed)
        if "plain" in runs:
            yield dict(base, run="plain", mode=None)
        for mode in modes:
            if "fixed" in runs and kind != "healthy":
                for t in FIXED[mode]:
                    yield dict(base, run=f"fixed={t:g}", mode=mode)
            for run in runs:
                if run.startswith("auto"):
                    yield dict(base, run=run, mode=mode)


# --- tables -----------------------------------------------------------------------------------------


def load(path, label=None):
    """The rows of a results file (`.jsonl`, or `.jsonl.gz` as in `benchmarks/results/`)."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if label is None or r.get("label", "") == label]


def cells(rows):
    by = collections.defaultdict(dict)
    for r in rows:
        by[(r["kind"], r["family"], r["optimizer"], r["seed"])][(r["run"], r["mode"])] = r
    return by


def judge(cell, mode, auto_run="auto"):
    """`(plain, best fixed, auto, ratio, hurt)` of one cell for one mode, or None."""
    fixed = [cell.get((f"fixed={t:g}", mode)) for t in FIXED[mode]]
    plain, auto = cell.get(("plain", None)), cell.get((auto_run, mode))
    if plain is None or auto is None or None in fixed:
        return None
    finite = [f["val_mse"] for f in fixed if f["val_mse"] is not None]
    best = min(finite) if finite else None
    inf = float("inf")
    auto_mse = auto["val_mse"] if auto["val_mse"] is not None else inf
    plain_mse = plain["val_mse"] if plain["val_mse"] is not None else inf
    ratio = auto_mse / best if best else inf
    hurt = best is not None and (plain_mse > 2 * best)
    return plain_mse, best, auto_mse, ratio, hurt, auto


def table(rows, mode, auto_run="auto"):
    by = cells(rows)
    fmt = lambda v: "NaN" if v is None or v == float("inf") else f"{v:.3g}"  # noqa: E731
    lines = [f"\n### {mode}, `{auto_run}`: clean validation MSE\n",
             "| kind | family | opt | seed | plain | best fixed (t) | auto (switch) | auto / best | hurt |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    summary = collections.defaultdict(list)
    for key in sorted(by):
        kind, family, opt_name, seed = key
        if kind == "healthy":
            continue
        judged = judge(by[key], mode, auto_run)
        if judged is None:
            continue
        plain_mse, best, auto_mse, ratio, hurt, auto = judged
        best_t = min((c["val_mse"], r) for (r, m), c in by[key].items()
                     if m == mode and r.startswith("fixed") and c["val_mse"] is not None)[1] if best else ""
        switch = f"@{auto['switch_step']}" if auto["switch_step"] else "no switch"
        lines.append(f"| {kind} | {family} | {opt_name} | {seed} | {fmt(plain_mse)} | {fmt(best)} "
                     f"({best_t.replace('fixed=', '')}) | {fmt(auto_mse)} ({switch}) | {ratio:.2f} | "
                     f"{'yes' if hurt else ''} |")
        summary[kind].append((ratio, hurt, plain_mse == float("inf"), auto_mse))
    lines += ["", "| kind | runs | hurt (plain > 2x best fixed or NaN) | auto within 1.5x on hurt | "
              "worst on hurt | plain NaN -> auto finite | geometric mean (all) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    totals = [0, 0, 0]
    for kind, items in summary.items():
        hurt = [r for r, h, _, _ in items if h]
        within = sum(r <= 1.5 for r in hurt)
        nan = [(a != float("inf")) for _, _, p, a in items if p]
        gm = float(np.exp(np.mean(np.log([max(r, 1e-9) for r, _, _, _ in items if r != float("inf")]))))
        totals[0] += len(hurt)
        totals[1] += within
        totals[2] = max(totals[2], max(hurt) if hurt else 0)
        lines.append(f"| {kind} | {len(items)} | {len(hurt)} | {within}/{len(hurt)} | "
                     f"{max(hurt) if hurt else float('nan'):.2f} | {sum(nan)}/{len(nan)} | {gm:.2f} |")
    if totals[0]:
        lines.append(f"| **all** | | {totals[0]} | **{totals[1]}/{totals[0]} = {100 * totals[1] / totals[0]:.0f}%** "
                     f"| **{totals[2]:.2f}** | | |")
    return "\n".join(lines)


def summary_table(rows):
    """One line per (mode, kind): hurt runs, auto within 1.5x / 3x of the best fixed, worst, finite."""
    by = cells(rows)
    lines = ["| mode | kind | runs | hurt | auto within 1.5x of the best fixed | within 3x | worst | "
             "plain NaN: auto finite |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    total = collections.Counter()
    for mode in ("clipnorm", "global_clipnorm", "clipvalue"):
        for kind in KINDS:
            judged = [judge(by[key], mode) for key in by if key[0] == kind]
            judged = [j for j in judged if j is not None]
            if not judged or kind == "healthy":
                continue
            hurt = [j for j in judged if j[4] or j[0] == float("inf")]
            ratios = [j[3] for j in hurt]
            nan = [j for j in judged if j[0] == float("inf")]
            within, within3 = sum(r <= 1.5 for r in ratios), sum(r <= 3 for r in ratios)
            total.update({(mode, "hurt"): len(hurt), (mode, "within"): within, (mode, "within3"): within3})
            lines.append(f"| {mode} | {kind} | {len(judged)} | {len(hurt)} | {within}/{len(hurt)} | {within3}/{len(hurt)} | "
                         f"{max(ratios) if ratios else float('nan'):.2f} | "
                         f"{sum(j[2] != float('inf') for j in nan)}/{len(nan)} |")
        if total[(mode, "hurt")]:
            h = total[(mode, "hurt")]
            lines.append(f"| **{mode}** | **all** | | **{h}** | **{total[(mode, 'within')]}/{h} = "
                         f"{100 * total[(mode, 'within')] / h:.0f}%** | {total[(mode, 'within3')]}/{h} | | |")
    return "\n".join(lines)


def healthy_table(rows):
    by = cells(rows)
    lines = ["\n### healthy runs\n", "| family | opt | seed | mode | alarms | switched | weights = plain |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(k for k in by if k[0] == "healthy"):
        plain = by[key].get(("plain", None))
        for (run, mode), r in sorted(by[key].items(), key=str):
            if not run.startswith("auto"):
                continue
            same = plain is not None and r["weights_digest"] == plain["weights_digest"] and r["val_mse"] == plain["val_mse"]
            lines.append(f"| {key[1]} | {key[2]} | {key[3]} | {mode} {run} | {r['alarms']} | "
                         f"{'yes' if r['switch_step'] else 'no'} | {'yes' if same else 'NO'} |")
    return "\n".join(lines)


def _key(run):
    return tuple(run[k] for k in ("kind", "family", "optimizer", "seed", "run", "mode"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["clipnorm", "global_clipnorm"])
    parser.add_argument("--runs", nargs="+", default=["plain", "fixed", "auto"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default="auto_threshold.jsonl")
    parser.add_argument("--table", help="print the tables of a results file and exit")
    parser.add_argument("--table-label", default=None, help="only the rows with this label")
    parser.add_argument("--table-seeds", type=int, nargs="+", help="only the rows of these seeds")
    args = parser.parse_args()
    if args.table:
        rows = load(args.table, args.table_label)
        if args.table_seeds:
            rows = [r for r in rows if r["seed"] in args.table_seeds]
        for mode in ("clipnorm", "global_clipnorm", "clipvalue"):
            for auto_run in sorted({r["run"] for r in rows if r["run"].startswith("auto")}):
                if any(r["mode"] == mode and r["run"] == auto_run for r in rows):
                    print(table(rows, mode, auto_run))
        print(healthy_table(rows))
        print("\n### summary\n")
        print(summary_table(rows))
        return
    jobs = list(jobs_for(args.kinds, args.families, args.optimizers, args.seeds, args.modes, args.runs))
    if os.path.exists(args.out):  # resume: runs already in the file (same label) are not run again
        done = {_key(r) for r in load(args.out) if r.get("label", "") == args.label}
        jobs = [job for job in jobs if _key(job) not in done]
    print(f"{len(jobs)} runs", flush=True)
    context = multiprocessing.get_context("spawn")
    # A fresh worker every 10 runs: a long-lived one keeps growing (10.6 GB resident after ~1000
    # runs, measured), and the machine then swaps. (`multiprocessing.Pool`: `ProcessPoolExecutor`
    # with `max_tasks_per_child` hung here after the first worker's 10 runs, Python 3.11.7.)
    with context.Pool(args.workers, maxtasksperchild=10) as pool, open(args.out, "a") as out:
        for result in pool.imap(train, jobs, chunksize=1):
            result["label"] = args.label
            out.write(json.dumps(result) + "\n")
            out.flush()
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

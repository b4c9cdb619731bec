"""`clip_threshold="auto"` against fixed clipping thresholds on rare corrupted targets.

Two regressors trained with SGD + momentum on synthetic data where a few
training targets (0.5%) are multiplied by 60 -- a common cause of gradient
explosions -- scored by the MSE on *clean* validation data:

* `mlp`: Dense(64, relu) x 2 -> Dense(1) on 16 features;
* `gru`: GRU(32) -> Dense(1) on sequences of 20 x 4.

Runs per scenario and seed (same initial weights and batches for all):
`plain`; `clipnorm` 0.1 / 0.3 / 1 / 3 from the start (Keras' own clipping);
`auto`: plain SGD + `GradientMonitor(auto_clip=MODE, clip_threshold="auto")`
with the rule of the gradwatch on `PYTHONPATH` (run it once with the main
branch's checkout first to score the old rule, `--label old`); candidate rules
are given as `--auto p10,w256,pooled,reset` (percentile, window, one pooled
threshold instead of per-variable ones, reset momentum at the switch).
`healthy`: the same scenario without corrupted targets, with "auto": clipping
must never switch on.

    python benchmarks/auto_threshold.py --out /tmp/auto.jsonl --seeds 0 1 2
    python benchmarks/auto_threshold.py --out /tmp/auto.jsonl --runs auto --auto p25 p50,pooled
    python benchmarks/auto_threshold.py --table /tmp/auto.jsonl

Results are appended as JSON lines; `--table` prints the markdown tables.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time

sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # PYTHONPATH first
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

FIXED = (0.1, 0.3, 1.0, 3.0)
SCENARIOS = {  # model, samples, epochs, batch, learning rate, momentum, corrupted fraction and factor
    "mlp": dict(model="mlp", train=2048, epochs=5, batch=32, lr=0.02, momentum=0.9, fraction=0.005, factor=60.0),
    "gru": dict(model="gru", train=2048, epochs=4, batch=32, lr=0.02, momentum=0.9, fraction=0.005, factor=60.0),
    # Fewer, larger corruptions: the first explosion comes in the first steps,
    # while the norms are still large (the window starts with them).
    "mlp_early": dict(model="mlp", train=2048, epochs=5, batch=32, lr=0.02, momentum=0.9, fraction=0.002,
                      factor=1000.0),
}


def data(scenario, seed, corrupt=True):
    """`(x, y, x_val, y_val)`: train targets with rare corruption, clean validation."""
    rng = np.random.default_rng(seed)
    settings = SCENARIOS[scenario]
    n = settings["train"] + 512
    if settings["model"] == "mlp":
        x = rng.normal(size=(n, 16))
        w = rng.normal(size=(16, 2)) / 4.0
        y = x @ w[:, :1] + 0.5 * np.tanh(x @ w[:, 1:]) + 0.3 * x[:, :1] * x[:, 1:2]
    else:
        x = rng.normal(size=(n, 20, 4))
        w = rng.normal(size=(4,)) / 2.0
        y = x[:, -8:, 0].mean(1, keepdims=True) * 2.0 + np.tanh(x[:, -3:] @ w).mean(1)[:, None]
    y = (y - y.mean()) / y.std()
    x, y = x.astype("float32"), y.astype("float32")
    x_val, y_val, x, y = x[-512:], y[-512:], x[:-512], y[:-512].copy()
    if corrupt:
        bad = rng.choice(len(y), int(round(settings["fraction"] * len(y))), replace=False)
        y[bad] *= settings["factor"]
    return x, y, x_val, y_val


def model(kind, seed, optimizer):
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if kind == "mlp":
        net = keras.Sequential([keras.Input((16,)), layers.Dense(64, activation="relu"),
                                layers.Dense(64, activation="relu"), layers.Dense(1)])
    else:
        net = keras.Sequential([keras.Input((20, 4)), layers.GRU(32), layers.Dense(1)])
    net.compile(optimizer=optimizer, loss="mse")
    return net


def parse_auto(spec):
    """`p10,w256,pooled,reset` -> (AutoThreshold, reset momentum)."""
    from gradwatch import clipping

    fields, reset = {}, False
    for part in filter(None, (spec or "").split(",")):
        if part == "pooled":
            fields["per_variable"] = False
        elif part == "frozen":
            fields["follow"] = False
        elif part == "reset":
            reset = True
        elif part[0] == "p":
            fields["percentile"] = float(part[1:])
        elif part[0] == "w":
            fields["window"] = int(part[1:])
        else:
            raise ValueError(f"unknown part {part!r} of --auto {spec!r}")
    if not hasattr(clipping, "AutoThreshold"):  # the old rule (main before issue 13)
        return None, reset
    return clipping.AutoThreshold(**fields), reset  # the defaults, changed by `fields`


def train(kind, seed, run, mode, auto_spec=None, corrupt=True):
    import keras

    import gradwatch
    from gradwatch import clipping

    settings = SCENARIOS[kind]
    x, y, x_val, y_val = data(kind, seed, corrupt)
    clip = {mode: float(run.split("=")[1])} if run.startswith("fixed") else {}
    optimizer = keras.optimizers.SGD(settings["lr"], momentum=settings["momentum"], **clip)
    net = model(settings["model"], seed, optimizer)
    callbacks, monitor = [keras.callbacks.TerminateOnNaN()], None
    if run in ("auto", "healthy"):
        extra = {}
        auto, reset = parse_auto(auto_spec)
        if auto is not None:
            clipping.AUTO = auto
        if reset:
            extra["reset_momentum"] = True
        monitor = gradwatch.GradientMonitor(tempfile.mkdtemp(prefix="gw_auto_"), auto_clip=mode,
                                            clip_threshold="auto", verbose=0, **extra)
        callbacks.append(monitor)
    start = time.time()
    net.fit(x, y, batch_size=settings["batch"], epochs=settings["epochs"], verbose=0, callbacks=callbacks)
    pred = net.predict(x_val, batch_size=512, verbose=0)
    mse = float(np.mean((pred - y_val) ** 2))
    switch = monitor.clipping_events[0] if monitor is not None and monitor.clipping_events else None
    return {"scenario": kind, "seed": seed, "run": run, "mode": mode, "val_mse": mse if np.isfinite(mse) else None,
            "switch_step": switch and switch["step"], "switch_threshold": switch and switch["threshold"],
            "final_threshold": monitor and getattr(net.optimizer, mode, None),
            "seconds": round(time.time() - start, 1)}


def table(path, mode):
    rows = [json.loads(line) for line in open(path)]
    rows = [r for r in rows if r["mode"] == mode]
    if not rows:
        return
    by = collections.defaultdict(dict)
    for r in rows:
        name = r["run"] if r["run"] not in ("auto", "healthy") else f"{r['run']} {r.get('label', '')}".strip()
        by[(r["scenario"], r["seed"])][name] = r
    names = sorted({n for cell in by.values() for n in cell}, key=lambda n: (not n.startswith("fixed"), n))
    fmt = lambda v: "NaN" if v is None else f"{v:.3g}"  # noqa: E731
    print(f"\nmode {mode}: clean validation MSE (switch step for auto runs)\n")
    print("| scenario | seed | best fixed | " + " | ".join(names) + " |")
    print("|" + " --- |" * (3 + len(names)))
    for (scenario, seed), cell in sorted(by.items()):
        fixed = [c["val_mse"] for n, c in cell.items() if n.startswith("fixed") and c["val_mse"] is not None]
        best = min(fixed) if fixed else None
        out = []
        for n in names:
            c = cell.get(n)
            if c is None:
                out.append("")
                continue
            text = fmt(c["val_mse"])
            if c["run"] in ("auto", "healthy"):
                text += f" (@{c['switch_step']})" if c["switch_step"] else " (no switch)"
                if best and c["val_mse"] is not None and c["run"] == "auto":
                    text += f" {c['val_mse'] / best:.2f}x"
            out.append(text)
        print(f"| {scenario} | {seed} | {fmt(best)} | " + " | ".join(out) + " |")
    summary(by, names)


def summary(by, names):
    """Per auto rule: its val MSE over the best fixed threshold's, and over `fixed=1`'s."""
    print("\n| rule | runs | worst / best fixed | geometric mean / best fixed | within 1.5x | "
          "worst / fixed=1 (MLP runs) |")
    print("|" + " --- |" * 6)
    for name in names:
        if not name.startswith("auto"):
            continue
        ratios, versus_one = [], []
        for (scenario, _), cell in by.items():
            run = cell.get(name)
            fixed = [c["val_mse"] for n, c in cell.items() if n.startswith("fixed")]
            if run is None or None in fixed or len(fixed) < len(FIXED):
                continue
            mse = run["val_mse"] if run["val_mse"] is not None else float("inf")
            ratios.append(mse / min(fixed))
            if scenario.startswith("mlp"):
                versus_one.append(mse / cell["fixed=1"]["val_mse"])
        if ratios:
            within = sum(r <= 1.5 for r in ratios)
            print(f"| {name} | {len(ratios)} | {max(ratios):.2f} | {np.exp(np.mean(np.log(ratios))):.2f} | "
                  f"{within}/{len(ratios)} | {max(versus_one) if versus_one else float('nan'):.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mode", default="clipnorm")
    parser.add_argument("--runs", nargs="+", default=["plain", "fixed", "auto", "healthy"])
    parser.add_argument("--auto", nargs="+", default=[""], help="candidate rules, e.g. p10 p25,pooled")
    parser.add_argument("--label", default="", help="label of the auto runs (e.g. old)")
    parser.add_argument("--out", default="auto_threshold.jsonl")
    parser.add_argument("--table", help="print the tables of a results file and exit")
    args = parser.parse_args()
    if args.table:
        for mode in ("clipnorm", "global_clipnorm", "clipvalue"):
            table(args.table, mode)
        return
    jobs = []
    for kind in args.scenarios:
        for seed in args.seeds:
            for run in args.runs:
                if run == "fixed":
                    jobs += [(kind, seed, f"fixed={t:g}", None) for t in FIXED]
                elif run in ("auto", "healthy"):
                    jobs += [(kind, seed, run, spec) for spec in args.auto]
                else:
                    jobs.append((kind, seed, run, None))
    for kind, seed, run, spec in jobs:
        result = train(kind, seed, run, args.mode, spec, corrupt=run != "healthy")
        result["label"] = " ".join(filter(None, [args.label, spec or ""]))
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""Step-time overhead of gradwatch against plain `model.fit` (issue 2 item 4).

Every configuration (plain, gradwatch settings, Keras' TensorBoard callback)
trains its own instance of the same model (same initial weights, same
synthetic data) in ONE process. Each configuration runs one long `fit()` in
its own thread, but the threads take turns: a scheduler lets exactly one of
them run one block of steps (a sixth of an epoch by default) at a time, in a
fresh random order for every block. So the configurations are interleaved
finely in time (a slow spell of a shared virtual machine, which lasts from
milliseconds to seconds, hits every configuration alike), nothing runs
concurrently, and no `fit()` is restarted (that start-up cost is not a step
cost and is reported apart, as "trace").

A block is timed from its first step's `on_train_batch_begin` (first
callback) to its last step's `on_train_batch_end` (last callback); an epoch's
last block ends after every callback's `on_epoch_end`. So an epoch's time, the
sum of its blocks, includes every callback's batch and epoch-end work
(gradwatch's drains and flush, TensorBoard's histograms). Per epoch (round)
the ratio of a configuration is its epoch time over plain's; the table shows
the median ratio over the measured epochs (the first `--warmup`, which trace
and warm up, are dropped) and the median ms/step.

    python benchmarks/overhead.py                  # ~6-8 min on 2 shared cores
    python benchmarks/overhead.py --quick          # ~2 min, fewer/shorter rounds
    python benchmarks/overhead.py --profile        # + breakdown configurations
    python benchmarks/overhead.py --workloads mlp --rounds 15

Breakdown configurations (`--profile`):

* `gw hook only`: the in-graph capture installed, nothing read from the device
  (no drain, no writing): the cost of the in-graph ops alone;
* `gw update_freq=1, no writing`: drains every step (reads the device buffer,
  alert scan) but writes nothing: cost of the per-step host read;
* and, timed inside the `gw update_freq=1` run, the host time per step spent in
  `Recorder._drain`, split into the device read (`DeviceState.read_since`) and
  `EventWriter.write_scalars`.
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402

common.quiet_tensorflow()

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import gradwatch  # noqa: E402

layers = keras.layers


# -- workloads -------------------------------------------------------------------
def _mlp():
    return keras.Sequential([layers.Input((32,))]
                            + [layers.Dense(64, activation="relu") for _ in range(8)]
                            + [layers.Dense(1)])


def _lstm():
    return keras.Sequential([layers.Input((50, 16)), layers.LSTM(64, return_sequences=True),
                             layers.LSTM(64), layers.Dense(1)])


def _cnn():
    return keras.Sequential([
        layers.Input((32, 32, 3)),
        layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        layers.GlobalAveragePooling2D(), layers.Dense(10)])


# name: (builder, input shape, batch, steps per epoch, loss, output fn)
WORKLOADS = {
    "mlp": dict(build=_mlp, shape=(32,), batch=256, steps=300, loss="mse", classes=None),
    "lstm": dict(build=_lstm, shape=(50, 16), batch=64, steps=30, loss="mse", classes=None),
    "cnn": dict(build=_cnn, shape=(32, 32, 3), batch=64, steps=60,
                loss="sparse_categorical_crossentropy_logits", classes=10),
}
TITLES = {"mlp": "MLP 8xDense(64), batch 256", "lstm": "LSTM 2xLSTM(64), seq 50, batch 64",
          "cnn": "CNN 3xConv2D, 32x32x3, batch 64"}


def _data(spec, steps, seed=0):
    rng = np.random.default_rng(seed)
    n = spec["batch"] * steps
    x = rng.standard_normal((n,) + spec["shape"]).astype("float32")
    if spec["classes"]:
        y = rng.integers(0, spec["classes"], size=(n,)).astype("int32")
    else:
        y = rng.standard_normal((n, 1)).astype("float32")
    return x, y


def _loss(spec):
    if spec["loss"] == "sparse_categorical_crossentropy_logits":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return spec["loss"]


# -- configurations ---------------------------------------------------------------
class _HookOnly(gradwatch.GradientMonitor):
    """In-graph capture installed; the device buffer is never read."""

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        for recorder in self._recorders:
            recorder.capture.state.record_count.assign(0)  # nothing to drain
        super().on_train_end(logs)


class _NoWrite(gradwatch.GradientMonitor):
    """Drains (device read + alert scan) at `update_freq` but writes nothing."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._recorders[0]._output.write = lambda *args, **kwargs: None


class _Timed(gradwatch.GradientMonitor):
    """A normal monitor whose host work is timed: drain, device read, write."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.timing = {"drain": 0.0, "read": 0.0, "write_scalars": 0.0, "drains": 0, "records": 0}
        rec = self._recorders[0]
        timing = self.timing
        drain, read, write = rec._drain, rec.capture.state.read_since, rec.writer.write_scalars

        def timed_drain(epoch, flush):
            t = time.perf_counter()
            drain(epoch, flush)
            timing["drain"] += time.perf_counter() - t
            timing["drains"] += 1

        def timed_read(already, latest=None):
            t = time.perf_counter()
            out = read(already, latest)
            timing["read"] += time.perf_counter() - t
            timing["records"] += len(out[0])
            return out

        def timed_write(step, values, wall_time=None):
            t = time.perf_counter()
            write(step, values, wall_time)
            timing["write_scalars"] += time.perf_counter() - t

        rec._drain = timed_drain
        rec.capture.state.read_since = timed_read
        rec.writer.write_scalars = timed_write


_ONLY = None  # --only
_NO_VARIANTS = False  # --no-variants


def configurations(log_root, profile):
    def gw(cls=gradwatch.GradientMonitor, **kwargs):
        return lambda name: [cls(os.path.join(log_root, name), verbose=0, **kwargs)]

    def tb(**kwargs):
        return lambda name: [keras.callbacks.TensorBoard(os.path.join(log_root, name), **kwargs)]

    auto = dict(auto_clip="clipnorm", clip_threshold="auto")
    configs = {
        "plain": lambda name: [],
        "plain, a second instance (control: the noise floor)": lambda name: [],
        "gradwatch defaults (update_freq=100)": gw(),
        "gradwatch update_freq=1": gw(_Timed, update_freq=1) if profile else gw(update_freq=1),
        "gradwatch auto_clip='clipnorm'": gw(auto_clip="clipnorm"),
        "gradwatch auto_clip='clipnorm', clip_threshold='auto'": gw(**auto),
        # Issue 24: the reset's untaken cond (momentum zeroed, Adam's second moments capped) apart.
        "gradwatch auto_clip='clipnorm', clip_threshold='auto', reset_momentum=False": gw(**auto, reset_momentum=False),
        # Issue 24: the overshoot watch's untaken branch (it runs only once clipping is on) apart.
        "gradwatch auto_clip='clipnorm', clip_threshold='auto' without the overshoot watch": gw(
            auto_clip="clipnorm", clip_threshold=gradwatch.AutoThreshold(overshoot_gain=0.0, update_gain=0.0)),
        # Issue 24: the restart's and the rollback's untaken `If`s (weights kept; restored) and the
        # rollback's copy every 32+ steps apart.
        "gradwatch auto_clip='clipnorm', clip_threshold='auto' without the restart nor the rollback": gw(
            auto_clip="clipnorm", clip_threshold=gradwatch.AutoThreshold(restart_steps=0, rollback_steps=0)),
        "gradwatch auto_clip='clipnorm', clip_threshold='auto' without the rollback": gw(
            auto_clip="clipnorm", clip_threshold=gradwatch.AutoThreshold(rollback_steps=0)),
        # Issue 24 (session 9): the first steps judged again (8 scalar kernels a step) apart.
        "gradwatch auto_clip='clipnorm', clip_threshold='auto' without judging the first steps again": gw(
            auto_clip="clipnorm", clip_threshold=gradwatch.AutoThreshold(rejudge_ratio=float("inf"))),
        # Issue 25: culprits=False (the default) keeps nothing and adds nothing to the step;
        # "rank" and True keep exploding batches on the device (an untaken tf.cond on healthy
        # steps, and a one-scalar read every 8 steps); on healthy steps they cost the same
        # (True only writes more when a step explodes). The first rows are the noise floor.
        "gradwatch culprits=False": gw(culprits=False),
        "gradwatch culprits='rank'": gw(culprits="rank"),
        "gradwatch culprits=True": gw(culprits=True),
        "TensorBoard()": tb(),
        "TensorBoard(histogram_freq=1, update_freq='batch')": tb(histogram_freq=1, update_freq="batch"),
        # Variants (issue 22): each against its own plain run, `plain [variant]`.
        "plain [xla]": lambda name: [],
        "gradwatch defaults [xla]": gw(),
        "gradwatch auto_clip='clipnorm', clip_threshold='auto' [xla]": gw(**auto),
        "plain [mixed_float16]": lambda name: [],
        "gradwatch defaults [mixed_float16]": gw(),
        "gradwatch auto_clip='clipnorm', clip_threshold='auto' [mixed_float16]": gw(**auto),
    }
    if _NO_VARIANTS:
        configs = {name: make for name, make in configs.items() if variant(name) is None}
    if _ONLY:
        configs = {name: make for name, make in configs.items()
                   if name.startswith("plain") or any(part in name for part in _ONLY)}
        variants = {variant(name) for name in configs} - {None}
        configs = {name: make for name, make in configs.items()
                   if not name.startswith("plain [") or variant(name) in variants and any(
                       variant(other) == variant(name) and not other.startswith("plain") for other in configs)}
    if profile:
        configs["gw hook only (no read, no write)"] = gw(_HookOnly)
        configs["gw update_freq=1, read but no write"] = gw(_NoWrite, update_freq=1)
    return configs


def variant(name):
    """`"xla"`, `"mixed_float16"` or None (the plain build), from a configuration's name."""
    if name.endswith("]") and " [" in name:
        return name.rsplit(" [", 1)[1][:-1]
    return None


def reference(name):
    """The configuration `name` is compared with: plain, or plain of its variant."""
    kind = variant(name)
    return "plain" if kind is None else f"plain [{kind}]"


# -- interleaving -----------------------------------------------------------------
class Turns:
    """Lets one named thread at a time run an epoch, following a schedule."""

    def __init__(self, names, rounds, seed):
        rng = random.Random(seed)
        self.schedule = []
        for _ in range(rounds):
            order = list(names)
            rng.shuffle(order)
            self.schedule += order
        self.pos = 0
        self.failed = set()
        self.cond = threading.Condition()

    def _skip_failed(self):
        while self.pos < len(self.schedule) and self.schedule[self.pos] in self.failed:
            self.pos += 1

    def wait(self, name):
        with self.cond:
            self.cond.wait_for(lambda: self.schedule[self.pos] == name)

    def done(self):
        with self.cond:
            self.pos += 1
            self._skip_failed()
            self.cond.notify_all()

    def fail(self, name, holding):
        with self.cond:
            self.failed.add(name)
            if holding:
                self.pos += 1
            self._skip_failed()
            self.cond.notify_all()


class _BlockStart(keras.callbacks.Callback):
    """First callback: waits for this configuration's turn at each block's first step."""

    def __init__(self, turns, name, record, block_steps):
        super().__init__()
        self.turns, self.name, self.record, self.block_steps = turns, name, record, block_steps

    def on_train_batch_begin(self, batch, logs=None):
        if batch % self.block_steps == 0:
            self.turns.wait(self.name)
            self.record["holding"] = True
            self.record["t0"] = time.perf_counter()
            self.record["c0"] = time.process_time()


class _BlockEnd(keras.callbacks.Callback):
    """Last callback: ends a block after its last step's callbacks; the epoch's
    last block ends after every callback's `on_epoch_end` (drains, flushes)."""

    def __init__(self, turns, record, block_steps, steps):
        super().__init__()
        self.turns, self.record, self.block_steps, self.steps = turns, record, block_steps, steps
        self.wall = self.cpu = 0.0

    def _end_block(self):
        self.wall += time.perf_counter() - self.record["t0"]
        self.cpu += time.process_time() - self.record["c0"]
        self.record["holding"] = False
        self.turns.done()

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.block_steps == 0 and batch + 1 < self.steps:
            self._end_block()

    def on_epoch_end(self, epoch, logs=None):
        self._end_block()
        self.record["epochs"].append(self.wall)
        self.record["cpu"].append(self.cpu)
        self.wall = self.cpu = 0.0


def run_workload(key, rounds, warmup, steps, profile, seed, log_root, block_steps=None):
    spec = WORKLOADS[key]
    steps = steps or spec["steps"]
    block_steps = block_steps or max(1, steps // 6)
    x, y = _data(spec, steps)
    keras.utils.set_random_seed(seed)
    reference = spec["build"]()
    weights = reference.get_weights()
    configs = configurations(os.path.join(log_root, key), profile)
    turns = Turns(list(configs), (rounds + warmup) * -(-steps // block_steps), seed)
    records, threads = {}, []
    for name, make_callbacks in configs.items():
        kind = variant(name)
        if kind == "mixed_float16":
            keras.config.set_dtype_policy("mixed_float16")
        try:
            model = spec["build"]()
        finally:
            keras.config.set_dtype_policy("float32")
        model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_loss(spec), jit_compile=kind == "xla")
        record = {"epochs": [], "cpu": [], "holding": False, "error": None}
        safe_name = "".join(c if c.isalnum() else "_" for c in name)
        callbacks = ([_BlockStart(turns, name, record, block_steps)] + make_callbacks(safe_name)
                     + [_BlockEnd(turns, record, block_steps, steps)])
        record["callbacks"] = callbacks

        def run(name=name, model=model, callbacks=callbacks, record=record):
            try:
                model.fit(x, y, batch_size=spec["batch"], epochs=rounds + warmup,
                          shuffle=False, verbose=0, callbacks=callbacks)
            except Exception as error:  # report and let the others go on
                record["error"] = repr(error)
                turns.fail(name, record["holding"])

        threads.append(threading.Thread(target=run, name=name, daemon=True))
        records[name] = record
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return summarize(key, records, warmup, steps, wall, profile)


def summarize(key, records, warmup, steps, wall, profile):
    out = {"key": key, "steps": steps, "wall": wall, "rows": {}}
    for name, record in records.items():
        epochs = record["epochs"]
        row = {}
        for clock in ("cpu", "epochs"):
            plain, mine = records[reference(name)][clock], record[clock]
            measured = list(range(warmup, min(len(mine), len(plain))))
            ratios = [mine[i] / plain[i] for i in measured]
            prefix = "cpu_" if clock == "cpu" else ""
            row[prefix + "ratio"] = common.median(ratios)
            row[prefix + "ratio_min"] = min(ratios) if ratios else float("nan")
            row[prefix + "ratio_max"] = max(ratios) if ratios else float("nan")
            row[prefix + "ms"] = 1e3 * common.median([mine[i] for i in measured]) / steps
        measured = list(range(warmup, len(epochs)))
        row.update({
            "trace_s": epochs[0] - common.median(epochs[warmup:]) if len(epochs) > warmup else float("nan"),
            "rounds": len(measured),
            "error": record["error"],
        })
        for cb in record["callbacks"]:
            timing = getattr(cb, "timing", None)
            if timing and timing["records"]:
                n = timing["records"]
                row["timing"] = {k: 1e6 * timing[k] / n for k in ("drain", "read", "write_scalars")}
                row["timing"]["drains_per_step"] = timing["drains"] / n
        out["rows"][name] = row
    return out


AUTO = "gradwatch auto_clip='clipnorm', clip_threshold='auto'"
TARGETS = {  # (config, workload): max ratio, from issue 22 (issue 2's were 1.05 / 1.15 on the MLP)
    ("gradwatch defaults (update_freq=100)", "mlp"): 1.04,
    ("gradwatch update_freq=1", "mlp"): 1.08,
    ("gradwatch auto_clip='clipnorm'", "mlp"): 1.10,
    (AUTO, "mlp"): 1.10,
    ("gradwatch defaults (update_freq=100)", "lstm"): 1.02,
    ("gradwatch update_freq=1", "lstm"): 1.05,
    ("gradwatch auto_clip='clipnorm'", "lstm"): 1.05,
    (AUTO, "lstm"): 1.05,
}


def _cell(row, prefix, target):
    cell = (f"**{row[prefix + 'ratio']:.3f}** ({row[prefix + 'ratio_min']:.2f}-"
            f"{row[prefix + 'ratio_max']:.2f}), {row[prefix + 'ms']:.2f} ms")
    if target:
        cell += f" [<= {target}: {'met' if row[prefix + 'ratio'] <= target else 'MISSED'}]"
    return cell


def ratio_table(results, prefix):
    keys = [r["key"] for r in results]
    names = list(results[0]["rows"])
    rows = []
    for name in names:
        cells = [name]
        for res in results:
            row = res["rows"].get(name)
            if row is None or row["error"]:
                cells.append("error: " + (row["error"][:60] if row else "missing"))
            else:
                cells.append(_cell(row, prefix, TARGETS.get((name, res["key"]))))
        rows.append(cells)
    return common.markdown_table(["configuration"] + [TITLES[k] for k in keys], rows)


def report(results):
    names = list(results[0]["rows"])
    lines = ["Process CPU time per epoch (robust to other processes on a shared machine):", "",
             ratio_table(results, "cpu_"), "",
             "Wall time per epoch:", "", ratio_table(results, ""), "",
             "Cells: median over rounds of (epoch time / plain's epoch time in the same round), "
             "(min-max over rounds), median ms/step (CPU ms of all threads, or wall ms).", ""]
    hist_name = "TensorBoard(histogram_freq=1, update_freq='batch')"
    for res in results:
        hist = res["rows"].get(hist_name)
        for name in names:
            row = res["rows"][name]
            if not name.startswith("gradwatch") or not hist or row["error"] or hist["error"]:
                continue
            for prefix, clock in (("cpu_", "CPU"), ("", "wall")):
                verdict = "faster" if row[prefix + "ratio"] < hist[prefix + "ratio"] else "NOT faster"
                lines.append(f"- {res['key']} ({clock}): {name} {row[prefix + 'ratio']:.3f} is {verdict} "
                             f"than {hist_name} {hist[prefix + 'ratio']:.3f}")
    lines.append("")
    lines.append(common.markdown_table(
        ["workload", "steps/epoch", "measured rounds", "wall (s)",
         "first-epoch extra wall s, plain", "first-epoch extra wall s, gradwatch defaults"],
        [[r["key"], r["steps"], r["rows"]["plain"]["rounds"], f"{r['wall']:.0f}",
          f"{r['rows']['plain']['trace_s']:.1f}",
          f"{r['rows'].get('gradwatch defaults (update_freq=100)', {}).get('trace_s', float('nan')):.1f}"]
         for r in results]))
    timing_rows = []
    for res in results:
        for name, row in res["rows"].items():
            if "timing" in row:
                t = row["timing"]
                timing_rows.append([res["key"], name, f"{t['drain']:.0f}", f"{t['read']:.0f}",
                                    f"{t['write_scalars']:.0f}", f"{row['ms'] * 1e3:.0f}"])
    if timing_rows:
        lines += ["", "Host wall time per logged step (microseconds), inside the update_freq=1 run:", ""]
        lines.append(common.markdown_table(
            ["workload", "configuration", "Recorder._drain (all)", "of which DeviceState.read_since",
             "of which EventWriter.write_scalars", "wall step time"], timing_rows))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,lstm,cnn")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 9, quick 5)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds dropped (tracing, warm-up)")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default per workload)")
    parser.add_argument("--quick", action="store_true", help="5 rounds, half-length epochs")
    parser.add_argument("--profile", action="store_true", help="add breakdown configurations")
    parser.add_argument("--block-steps", type=int, default=None,
                        help="steps per turn (default: a sixth of an epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None,
                        help="comma-separated substrings: run only the matching configurations (plain always)")
    parser.add_argument("--no-variants", action="store_true", help="leave out the XLA and mixed_float16 rows")
    args = parser.parse_args(argv)
    global _ONLY, _NO_VARIANTS
    _NO_VARIANTS = args.no_variants
    _ONLY = args.only.split(",") if args.only else None
    rounds = args.rounds or (5 if args.quick else 9)
    print(common.machine_info(), flush=True)
    log_root = tempfile.mkdtemp(prefix="gradwatch_overhead_")
    results = []
    try:
        for key in args.workloads.split(","):
            steps = args.steps or (WORKLOADS[key]["steps"] // 2 if args.quick else None)
            res = run_workload(key, rounds, args.warmup, steps, args.profile, args.seed, log_root,
                               args.block_steps)
            print(f"{key}: {res['wall']:.0f} s", flush=True)
            results.append(res)
            if len(results) < len(args.workloads.split(",")):
                print(report([res]), flush=True)  # partial results as they come
        print()
        print(report(results))
    finally:
        shutil.rmtree(log_root, ignore_errors=True)


if __name__ == "__main__":
    main()

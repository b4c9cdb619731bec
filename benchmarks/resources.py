"""Event-file size and memory of long runs at `update_freq=1` (issue 7 item 5).

Two parts:

1. **Host side, 100k steps x 200 layers** (`synthetic`). Real training of 100k
   steps of a 200-layer model is far too slow on 2 cores, so the device is
   replaced by a stand-in that returns, at each drain, the rows the compiled
   step would have written (5 header columns + 200 layer norms, log-normal
   norms, a finite threshold after warm-up). Everything else is gradwatch's
   own host path: `Recorder._drain` (alert scan, `AlertLog`, `_row_values`)
   and `EventWriter.write_scalars` into a real event file, one drain per step.
   Sampled every `--sample` steps: event-file size (after a flush), RSS and,
   in a second pass, `tracemalloc` (Python allocations). A linear fit of each
   against steps gives bytes/step and the memory slope. Variations show what
   the file size and memory depend on: the number of layers (tags per step)
   and `update_freq` (rows per drain), besides steps.

2. **Real `model.fit`** (`real`): 200 x `Dense(4)` layers, `update_freq=1`,
   2000 steps, plain vs gradwatch, each in a fresh process. Gives the
   real bytes/step of the event file and the RSS slope over steps (RSS sampled
   every `--sample-real` steps, fitted after the first epoch), and
   `tracemalloc` in a separate, shorter gradwatch run.

    python benchmarks/resources.py               # ~6-8 min on 2 cores
    python benchmarks/resources.py --quick       # 20k synthetic steps, 1000 real
    python benchmarks/resources.py --part synthetic --steps 100000
    python benchmarks/resources.py --part tensorboard   # 3. TensorBoard at 100k x 200 (~15 min)

3. **TensorBoard** (`tensorboard`, issue 15): see `tensorboard_scale.py`.
"""

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402

common.quiet_tensorflow()

import numpy as np  # noqa: E402

from gradwatch import state as state_module  # noqa: E402
from gradwatch import summaries  # noqa: E402
from gradwatch.policy import HostDetector, StepPolicy  # noqa: E402
from gradwatch.recorder import Recorder  # noqa: E402


# -- part 1: the host path with a stand-in device -----------------------------------
class _Iterations:
    def __init__(self):
        self.value = 0

    def numpy(self):
        return self.value


class _Optimizer:
    def __init__(self):
        self.iterations = _Iterations()


class SyntheticDevice:
    """Stands in for `DeviceState`: a numpy ring buffer of realistic rows."""

    def __init__(self, num_layers, capacity, seed=0):
        self.num_layers = num_layers
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.records = np.zeros([capacity, state_module.LAYERS_START + num_layers], np.float32)
        self.record_steps = np.zeros([capacity], np.int64)
        self.count = 0

    def step(self, step):
        """What the compiled step appends: one row."""
        layer_norms = self.rng.lognormal(-2.0, 0.5, self.num_layers).astype(np.float32)
        global_norm = float(np.sqrt(np.sum(np.square(layer_norms, dtype=np.float64))))
        row = self.records[self.count % self.capacity]
        row[state_module.GLOBAL] = global_norm
        row[state_module.GLOBAL_CLIPPED] = global_norm
        row[state_module.THRESHOLD] = np.nan  # monitoring only: the host detects (HostDetector)
        row[state_module.CLIP_THRESHOLD] = 0.0
        row[state_module.FLAGS] = 0.0
        row[state_module.LAYERS_START:] = layer_norms
        self.record_steps[self.count % self.capacity] = step
        self.count += 1

    def read_since(self, already_read, latest=None):  # same contract as DeviceState.read_since
        total = self.count
        fresh = total - already_read
        if fresh <= 0:
            return np.zeros([0], np.int64), np.zeros([0, self.records.shape[1]]), total, 0
        lost = max(0, fresh - self.capacity)
        first = total - min(fresh, self.capacity)
        slots = np.arange(first, total) % self.capacity
        return self.record_steps[slots], self.records[slots], total, lost


class SyntheticCapture:
    """Stands in for `KerasCapture` (no TensorFlow, no model)."""

    def __init__(self, num_layers, capacity):
        self.layer_paths = [f"dense_{i + 1}" for i in range(num_layers)]  # Keras' default names
        self.policy = StepPolicy()
        self.optimizer = _Optimizer()
        self.state = SyntheticDevice(num_layers, capacity)
        self.ready, self.traced = True, True
        self.model = type("Model", (), {"train_function": None})()
        self.host_detector = HostDetector(self.policy)

    def take_latest_record(self):
        return None

    def uninstall(self):
        pass


class _Monitor:
    top_layers = 3

    def __init__(self):
        self.explosions, self.clipping_events = [], []


def run_synthetic(steps, num_layers, update_freq, sample_every, trace_python, log_dir):
    """Drives Recorder + EventWriter for `steps` steps; returns samples and totals."""
    run_dir = os.path.join(log_dir, "train")
    writer = summaries.EventWriter(run_dir)
    capacity = 2 * (update_freq + 1) + 16  # as GradientMonitor._capacity
    capture = SyntheticCapture(num_layers, capacity)
    recorder = Recorder(_Monitor(), capture, writer, None)
    gc.collect()
    if trace_python:
        tracemalloc.start()
        tracemalloc.reset_peak()
    base_traced = tracemalloc.get_traced_memory()[0] if trace_python else 0
    samples = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        capture.state.step(step)
        capture.optimizer.iterations.value = step
        if step % update_freq == 0:
            recorder.drain(0)
        if step % sample_every == 0:
            recorder.writer.flush()
            traced = tracemalloc.get_traced_memory() if trace_python else (0, 0)
            samples.append({"step": step, "file": os.path.getsize(recorder.writer.path),
                            "rss": common.rss_bytes(), "py": traced[0] - base_traced,
                            "py_peak": traced[1] - base_traced})
    recorder.drain(0, flush=True)
    elapsed = time.perf_counter() - start
    py_peak = tracemalloc.get_traced_memory()[1] - base_traced if trace_python else None
    if trace_python:
        tracemalloc.stop()
    path = recorder.writer.path
    recorder.close()
    return {"steps": steps, "layers": num_layers, "update_freq": update_freq, "samples": samples,
            "seconds": elapsed, "file": os.path.getsize(path), "py_peak": py_peak,
            "explosions": len(recorder.monitor.explosions), "path": path}


def _slopes(samples, skip_fraction=0.1):
    """Per-step slopes of file size, RSS and Python memory (after a warm-up share)."""
    keep = samples[int(len(samples) * skip_fraction):] or samples
    xs = [s["step"] for s in keep]
    return {key: common.linear_fit(xs, [s[key] for s in keep])[0] for key in ("file", "rss", "py")}


def synthetic_part(args, log_root):
    lines = []
    steps = args.steps
    rows = []
    # 1. the headline run, without tracemalloc (timing, file, RSS)
    main = run_synthetic(steps, 200, 1, args.sample, False, os.path.join(log_root, "s_main"))
    # 2. the same with tracemalloc (Python allocations)
    traced_steps = args.traced_steps or steps
    traced = run_synthetic(traced_steps, 200, 1, args.sample, True, os.path.join(log_root, "s_traced"))
    # 3. variations, shorter: what the size and memory depend on
    short = max(steps // 10, 2000)
    variations = [run_synthetic(short, layers, freq, max(short // 20, 100), True,
                                os.path.join(log_root, f"s_{layers}_{freq}"))
                  for layers, freq in ((200, 1), (200, 100), (100, 1), (50, 1))]
    s_main, s_traced = _slopes(main["samples"]), _slopes(traced["samples"])
    rss = [s["rss"] for s in main["samples"]]
    lines.append(f"Synthetic device, real Recorder + EventWriter, {steps} steps, 200 layers, "
                 "update_freq=1 (one drain per step):")
    lines.append("")
    lines.append(common.markdown_table(
        ["quantity", "value"],
        [["event file", f"{common.mb(main['file']):.1f} MB ({main['file'] / steps:.0f} bytes/step; "
                        f"fitted slope {s_main['file']:.1f} bytes/step)"],
         ["host time", f"{main['seconds']:.1f} s ({1e6 * main['seconds'] / steps:.0f} us/step)"],
         ["RSS first / last / peak sample", f"{common.mb(rss[0]):.1f} / {common.mb(rss[-1]):.1f} / "
                                            f"{common.mb(max(rss)):.1f} MB"],
         ["RSS slope (after 10%)", f"{s_main['rss']:.3f} bytes/step "
                                   f"({common.mb(s_main['rss'] * steps):.2f} MB per {steps} steps)"],
         [f"Python allocations, peak above start (tracemalloc, {traced_steps} steps)",
          f"{traced['py_peak'] / 1e3:.0f} kB"],
         ["Python allocations slope (after 10%)", f"{s_traced['py']:.4f} bytes/step"],
         ["host time with tracemalloc", f"{traced['seconds']:.1f} s"],
         ["explosions flagged (healthy data)", str(main["explosions"])]]))
    lines.append("")
    lines.append("File size against steps (headline run):")
    lines.append("")
    marks = [s for s in main["samples"] if s["step"] in _marks(steps)]
    lines.append(common.markdown_table(
        ["steps", "file MB", "bytes/step", "RSS MB"],
        [[s["step"], f"{common.mb(s['file']):.2f}", f"{s['file'] / s['step']:.0f}",
          f"{common.mb(s['rss']):.1f}"] for s in marks]))
    lines.append("")
    lines.append(f"Variations, {short} steps each (tracemalloc on):")
    lines.append("")
    for var in variations:
        sl = _slopes(var["samples"])
        rows.append([var["layers"], var["update_freq"], f"{var['file'] / var['steps']:.0f}",
                     f"{sl['file']:.1f}", f"{var['py_peak'] / 1e3:.0f}", f"{sl['py']:.4f}",
                     f"{1e6 * var['seconds'] / var['steps']:.0f}"])
    lines.append(common.markdown_table(
        ["layers", "update_freq", "bytes/step", "fitted bytes/step", "Python peak kB",
         "Python slope bytes/step", "host us/step (traced)"], rows))
    return "\n".join(lines)


def _marks(steps):
    out = set()
    for fraction in (0.01, 0.1, 0.25, 0.5, 0.75, 1.0):
        out.add(int(round(steps * fraction)))
    return out


# -- part 2: real model.fit ----------------------------------------------------------
REAL_RUNS = (("plain", False, False), ("gradwatch update_freq=1", True, False),
             ("gradwatch update_freq=1, tracemalloc", True, True))


def real_run(monitored, trace, steps, epochs, sample_every, log_dir):
    """One `fit()` of the 200-layer model in this (fresh) process."""
    import keras

    import gradwatch

    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([layers.Input((4,))]
                             + [layers.Dense(4, activation="tanh") for _ in range(199)]
                             + [layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    batch, steps_per_epoch = 32, steps // epochs
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps_per_epoch, 4)).astype("float32")
    y = rng.standard_normal((batch * steps_per_epoch, 1)).astype("float32")

    class Sampler(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.samples, self.step = [], 0
            gc.collect()
            if trace:
                tracemalloc.start()
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step % sample_every == 0:
                py = tracemalloc.get_traced_memory()[0] if trace else 0
                self.samples.append({"step": self.step, "rss": common.rss_bytes(), "py": py,
                                     "t": time.perf_counter(), "cpu": time.process_time()})

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.start
            self.py_peak = tracemalloc.get_traced_memory()[1] if trace else None
            if trace:
                tracemalloc.stop()

    sampler = Sampler()
    monitor = gradwatch.GradientMonitor(log_dir, update_freq=1, verbose=0)
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0,
              callbacks=([monitor] if monitored else []) + [sampler])
    size = 0
    if monitored:
        run_dir = os.path.join(log_dir, "train")
        size = sum(os.path.getsize(os.path.join(run_dir, f)) for f in os.listdir(run_dir))
    keep = [s for s in sampler.samples if s["step"] > steps_per_epoch] or sampler.samples
    xs = [s["step"] for s in keep]
    span = keep[-1]["step"] - keep[0]["step"] if len(keep) > 1 else 0
    return {
        "file": size, "seconds": sampler.seconds, "steps": sampler.step,
        "steps_per_epoch": steps_per_epoch, "batch": batch,
        "step_ms": 1e3 * (keep[-1]["t"] - keep[0]["t"]) / span if span else float("nan"),
        "cpu_ms": 1e3 * (keep[-1]["cpu"] - keep[0]["cpu"]) / span if span else float("nan"),
        "rss_slope": common.linear_fit(xs, [s["rss"] for s in keep])[0],
        "rss_first": keep[0]["rss"], "rss_last": keep[-1]["rss"],
        "rss_max": max(s["rss"] for s in sampler.samples), "peak_rss": common.peak_rss_bytes(),
        "py_slope": common.linear_fit(xs, [s["py"] for s in keep])[0] if trace else None,
        "py_peak": sampler.py_peak,
        "layers": len(monitor.layer_paths) if monitored else None,
    }


def real_part(args, log_root):
    import json
    import subprocess

    results = {}
    for index, (name, monitored, trace) in enumerate(REAL_RUNS):
        steps = args.real_steps if not trace else max(args.real_steps // 2, 2 * args.real_epochs)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(index),
               "--real-steps", str(steps), "--real-epochs", str(args.real_epochs),
               "--sample-real", str(args.sample_real), "--log-dir", os.path.join(log_root, f"real{index}")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"  real: {name} done in {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for name, r in results.items():
        rows.append([name, r["steps"], f"{r['step_ms']:.1f} / {r['cpu_ms']:.1f}", f"{r['seconds']:.0f}",
                     f"{r['file'] / r['steps']:.0f}" if r["file"] else "-",
                     f"{common.mb(r['file']):.1f}" if r["file"] else "-",
                     f"{common.mb(r['file'] / r['steps'] * 100_000):.0f}" if r["file"] else "-",
                     f"{common.mb(r['rss_first']):.0f} / {common.mb(r['rss_last']):.0f} / "
                     f"{common.mb(r['peak_rss']):.0f}",
                     f"{r['rss_slope']:.1f}",
                     f"{r['py_slope']:.3f}" if r["py_slope"] is not None else "-",
                     f"{r['py_peak'] / 1e6:.1f}" if r["py_peak"] is not None else "-"])
    first = next(iter(results.values()))
    lines = [f"Real `model.fit`: 200 x Dense(4) (tanh), batch {first['batch']}, {args.real_epochs} epochs, "
             f"update_freq=1, each run in a fresh process; RSS sampled every {args.sample_real} steps, "
             "slopes fitted after the first epoch:", ""]
    lines.append(common.markdown_table(
        ["run", "steps", "ms/step wall / CPU (after epoch 1)", "fit s", "event bytes/step", "event MB",
         "MB per 100k steps", "RSS MB after epoch 1 / last / peak (VmHWM)", "RSS slope bytes/step",
         "Python alloc slope bytes/step", "Python peak MB"], rows))
    lines.append("")
    lines.append(f"Layers reported: {results['gradwatch update_freq=1']['layers']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "synthetic", "real", "tensorboard"), default="all")
    parser.add_argument("--tb-time-limit", type=int, default=300, help="seconds per fast-loader TensorBoard")
    parser.add_argument("--python-time-limit", type=int, default=600, help="seconds for the Python loader")
    parser.add_argument("--rss-limit-gb", type=float, default=8.0, help="TensorBoard is stopped past this RSS")
    parser.add_argument("--steps", type=int, default=None, help="synthetic steps (default 100000)")
    parser.add_argument("--traced-steps", type=int, default=None,
                        help="steps of the tracemalloc pass (default: --steps)")
    parser.add_argument("--sample", type=int, default=1000, help="synthetic sampling interval")
    parser.add_argument("--real-steps", type=int, default=None, help="real fit steps (default 2000)")
    parser.add_argument("--real-epochs", type=int, default=4)
    parser.add_argument("--sample-real", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        import json

        _, monitored, trace = REAL_RUNS[args.child]
        print(json.dumps(real_run(monitored, trace, args.real_steps, args.real_epochs,
                                  args.sample_real, args.log_dir)))
        return
    args.steps = args.steps or (20_000 if args.quick else 100_000)
    args.real_steps = args.real_steps or (800 if args.quick else 2000)
    print(common.machine_info(), flush=True)
    log_root = tempfile.mkdtemp(prefix="gradwatch_resources_")
    try:
        if args.part in ("all", "synthetic"):
            print(synthetic_part(args, log_root), flush=True)
            print(flush=True)
        if args.part in ("all", "real"):
            print(real_part(args, log_root), flush=True)
        if args.part == "tensorboard":  # not in "all": long, and it needs ~10 GB of memory
            import tensorboard_scale

            print(tensorboard_scale.tensorboard_part(args, log_root, run_synthetic, common), flush=True)
    finally:
        shutil.rmtree(log_root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Where the time goes (issue 22): in-graph cost and host cost of each configuration, apart.

Every configuration has its own copy of the same model (same weights, same
data), attached as `fit()` would attach it (`on_train_begin`, which traces the
hooked train function). Then, in ONE thread, blocks of `--block` steps take
turns in a fresh random order each round; a step is

    logs = model.train_function(iterator)          # timed: "graph"
    <Keras' per-step conversion of the logs to floats>
    monitor.on_train_batch_end(step, logs)        # timed: "host"

and every `--steps` steps an `on_epoch_end` (timed: "host"; drains and
flushes). Process CPU time (all threads: TensorFlow's pools and any
background thread of gradwatch) and wall time are summed per configuration
and round; cells are medians over rounds of the ratio to plain's total in the
same round. A second plain instance is the noise floor. No `fit()` loop, no
progress bar: this measures the step and gradwatch's callback, nothing else.

    python benchmarks/step_cost.py --rounds 11
    python benchmarks/step_cost.py --configs plain,defaults,auto --rounds 15
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
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


def _mlp():
    return keras.Sequential([layers.Input((32,))] + [layers.Dense(64, activation="relu") for _ in range(8)]
                            + [layers.Dense(1)])


def _lstm():
    return keras.Sequential([layers.Input((50, 16)), layers.LSTM(64, return_sequences=True),
                             layers.LSTM(64), layers.Dense(1)])


WORKLOADS = {"mlp": (_mlp, (32,), 256), "lstm": (_lstm, (50, 16), 64)}

CONFIGS = {  # name: (monitor kwargs or None for plain, compile kwargs)
    "plain": (None, {}),
    "plain2": (None, {}),
    "defaults": ({}, {}),
    "every_step": ({"update_freq": 1}, {}),
    "clipnorm": ({"auto_clip": "clipnorm"}, {}),
    "auto": ({"auto_clip": "clipnorm", "clip_threshold": "auto"}, {}),
    "global_auto": ({"auto_clip": "global_clipnorm", "clip_threshold": "auto"}, {}),
    "culprits": ({"culprits": True}, {}),
    # breakdown of auto_clip's in-graph cost (issue 22)
    "clipnorm_noskip": ({"auto_clip": "clipnorm", "skip_nonfinite": False}, {}),
    "clipnorm_noreset": ({"auto_clip": "clipnorm", "reset_momentum": False}, {}),
    "clipnorm_bare": ({"auto_clip": "clipnorm", "skip_nonfinite": False, "reset_momentum": False}, {}),
    "skip_only": ({"skip_nonfinite": True}, {}),
    "plain_xla": (None, {"jit_compile": True}),
    "defaults_xla": ({}, {"jit_compile": True}),
    "auto_xla": ({"auto_clip": "clipnorm", "clip_threshold": "auto"}, {"jit_compile": True}),
}


def reference_of(name):
    return "plain_xla" if name.endswith("_xla") else "plain"


class Runner:
    def __init__(self, name, workload, weights, x, y, log_root):
        build, _, batch = WORKLOADS[workload]
        kwargs, compile_kwargs = CONFIGS[name]
        self.name = name
        self.model = build()
        self.model.set_weights(weights)
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", **compile_kwargs)
        self.model.fit(x[:batch * 2], y[:batch * 2], batch_size=batch, epochs=1, verbose=0)  # build, trace
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True).repeat()
        self.iterator = iter(self.model.distribute_strategy.experimental_distribute_dataset(dataset))
        self.monitor = None
        self.model.make_train_function(force=True)
        if kwargs is not None:
            self.monitor = gradwatch.GradientMonitor(os.path.join(log_root, name), verbose=0, **kwargs)
            self.monitor.set_model(self.model)
            self.monitor.on_train_begin()
            self.monitor.on_epoch_begin(0)
        self.step = 0
        self.graph = self.host = self.wall = 0.0

    def run(self, steps, steps_per_epoch):
        function, monitor = self.model.train_function, self.monitor
        graph = host = 0.0
        wall = time.perf_counter()
        for _ in range(steps):
            c0 = time.process_time()
            logs = function(self.iterator)
            logs = {k: float(v) for k, v in logs.items()}  # Keras' per-step conversion (TF backend)
            c1 = time.process_time()
            graph += c1 - c0
            if monitor is not None:
                batch = self.step % steps_per_epoch
                monitor.on_train_batch_end(batch, logs)
                if batch + 1 == steps_per_epoch:
                    monitor.on_epoch_end(self.step // steps_per_epoch, logs)
                    monitor.on_epoch_begin(self.step // steps_per_epoch + 1)
                host += time.process_time() - c1
            self.step += 1
        return graph, host, time.perf_counter() - wall

    def finish(self):
        if self.monitor is not None:
            self.monitor.on_train_end()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--configs", default="plain,plain2,defaults,every_step,clipnorm,auto")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--block", type=int, default=50, help="steps per turn")
    parser.add_argument("--blocks", type=int, default=6, help="turns per configuration per round")
    parser.add_argument("--steps", type=int, default=300, help="steps per epoch (on_epoch_end)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    for name in names:
        if reference_of(name) not in names:
            names.insert(0, reference_of(name))
    print(common.machine_info(), flush=True)
    build, shape, batch = WORKLOADS[args.workload]
    keras.utils.set_random_seed(args.seed)
    weights = build().get_weights()
    rng = np.random.default_rng(args.seed)
    n = batch * args.steps
    x = rng.standard_normal((n,) + shape).astype("float32")
    y = rng.standard_normal((n, 1)).astype("float32")
    log_root = tempfile.mkdtemp(prefix="gradwatch_step_cost_")
    runners = {name: Runner(name, args.workload, weights, x, y, log_root) for name in names}
    order_rng = random.Random(args.seed)
    totals = {name: [] for name in names}  # per round: (graph, host, wall)
    try:
        for round_ in range(args.warmup + args.rounds):
            sums = {name: [0.0, 0.0, 0.0] for name in names}
            for _ in range(args.blocks):
                order = list(names)
                order_rng.shuffle(order)
                for name in order:
                    g, h, w = runners[name].run(args.block, args.steps)
                    sums[name][0] += g
                    sums[name][1] += h
                    sums[name][2] += w
            if round_ >= args.warmup:
                for name in names:
                    totals[name].append(sums[name])
        for runner in runners.values():
            runner.finish()
    finally:
        shutil.rmtree(log_root, ignore_errors=True)
    steps = args.block * args.blocks
    rows = []
    for name in names:
        ref = totals[reference_of(name)]
        mine = totals[name]
        cpu = [(m[0] + m[1]) / (r[0] + r[1]) for m, r in zip(mine, ref)]
        graph = [m[0] / (r[0] + r[1]) for m, r in zip(mine, ref)]
        host_us = [1e6 * m[1] / steps for m in mine]
        graph_extra_us = [1e6 * (m[0] - r[0]) / steps for m, r in zip(mine, ref)]
        wall = [m[2] / r[2] for m, r in zip(mine, ref)]
        rows.append([name, f"**{common.median(cpu):.3f}** ({min(cpu):.2f}-{max(cpu):.2f})",
                     f"{common.median(graph):.3f}", f"{common.median(graph_extra_us):+.0f}",
                     f"{common.median(host_us):.0f}", f"{common.median(wall):.3f}",
                     f"{1e3 * common.median([m[0] + m[1] for m in mine]) / steps:.3f}"])
    print(f"\n{args.workload}, batch {batch}; {args.rounds} rounds of {args.blocks} x {args.block} steps "
          f"per configuration, interleaved (reference: plain, or plain_xla for *_xla)\n")
    print(common.markdown_table(
        ["configuration", "CPU ratio (min-max)", "graph part of ratio", "graph extra us/step",
         "host us/step (callback)", "wall ratio", "CPU ms/step"], rows))


if __name__ == "__main__":
    main()

"""Kernels a train step runs, per configuration (issue 22): a deterministic measure of in-graph cost.

On a ~1.5 ms CPU step, gradwatch's in-graph cost is the number of small
kernels it adds (each costs the executor a few microseconds, whatever its
size), so counting them per step shows where the graph time goes without the
noise of a shared machine. Each configuration of `step_cost.py` is attached
as `fit()` attaches it, run 50 steps, then 30 steps under TensorFlow's
profiler; the trace's kernel events are counted per step (`Switch`/`Merge`/
`Identity`/`Const` are not traced; the data pipeline's `TensorSlice` events
are the same in every configuration).

    python benchmarks/step_kernels.py --configs plain,defaults,clipnorm,auto
"""

import argparse
import collections
import glob
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402

common.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from step_cost import WORKLOADS, Runner  # noqa: E402

_NOT_KERNELS = ("Iterator", "Threadpool", "Eager", "TFE_", "Executor", "Function", "Optional", "Prefetch",
                "multi_step", "__inference", " __inference", "KernelAndDevice", "Validate", "ParallelFor")


def count(runner, steps):
    logdir = tempfile.mkdtemp(prefix="gradwatch_kernels_")
    tf.profiler.experimental.start(logdir)
    runner.run(steps, 10 ** 9)
    tf.profiler.experimental.stop()
    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    counts = collections.Counter()
    for plane in space.planes:
        if "Host" not in plane.name and "CPU" not in plane.name:
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "?")
                if ":" in name and name.split(":")[1]:
                    name = name.split(":")[1]
                counts[name] += 1
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--configs", default="plain,defaults,every_step,clipnorm,auto,global_auto")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    build, shape, batch = WORKLOADS[args.workload]
    keras.utils.set_random_seed(0)
    weights = build().get_weights()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * 300,) + shape).astype("float32")
    y = rng.standard_normal((batch * 300, 1)).astype("float32")
    rows, first = [], None
    for name in args.configs.split(","):
        runner = Runner(name, args.workload, weights, x, y, tempfile.mkdtemp())
        runner.run(50, 10 ** 9)
        counts = count(runner, args.steps)
        runner.finish()
        kernels = {k: v / args.steps for k, v in counts.items() if not k.startswith(_NOT_KERNELS)}
        total = sum(kernels.values())
        first = first if first is not None else kernels
        extra = {k: kernels.get(k, 0) - first.get(k, 0) for k in set(kernels) | set(first)}
        top = ", ".join(f"{k} {v:+.0f}" for k, v in sorted(extra.items(), key=lambda t: -abs(t[1]))[:8]
                        if abs(v) >= 0.5)
        rows.append([name, f"{total:.0f}", f"{total - sum(first.values()):+.0f}",
                     f"{counts['ExecutorState::Process'] / args.steps:.0f}", top or "-"])
    print(common.markdown_table(["configuration", "kernels/step", f"vs {args.configs.split(',')[0]}",
                                 "executor tasks/step", "largest differences"], rows))


if __name__ == "__main__":
    main()

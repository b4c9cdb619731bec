"""The rescue: a recurrent net on the adding problem, plain vs clipped vs gradwatch.

Pascanu, Mikolov & Bengio (2013) showed recurrent nets hit "cliffs" where the
gradient norm jumps by orders of magnitude, and proposed norm clipping. Here a
ReLU RNN (`gradwatch.scenarios`) trained with plain SGD+momentum hits such a
cliff; the script trains, per seed:

- plain SGD (explodes),
- SGD with `global_clipnorm=1.0` from the start (the textbook fix),
- plain SGD + `GradientMonitor(auto_clip="global_clipnorm", clip_threshold=1.0)`,
- plain SGD + `GradientMonitor(auto_clip="global_clipnorm", clip_threshold="auto")`,

and prints the final validation MSE of each (predicting the mean scores 1/6).

    python examples/adding_problem.py --seeds 0 1 2
"""

import argparse
import math
import os

import keras

import gradwatch
from gradwatch.monitor import RESET_MOMENTUM
from gradwatch import scenarios

RUNS = {
    "plain": (None, None),
    "clip from start": (scenarios.SCENARIO["clip"], None),
    "gradwatch auto_clip=1.0": (None, 1.0),
    "gradwatch auto_clip=auto": (None, "auto"),
}


def train(seed, clip, auto_threshold, logdir, epochs, reset_momentum=RESET_MOMENTUM):
    keras.utils.clear_session()
    x, y, x_val, y_val = scenarios.scenario_data(seed)
    model = scenarios.build_adding_model(seed, scenarios.default_optimizer(clip))
    callbacks = [keras.callbacks.TerminateOnNaN()]
    monitor = None
    if auto_threshold is not None:
        monitor = gradwatch.GradientMonitor(logdir, auto_clip="global_clipnorm",
                                            clip_threshold=auto_threshold, reset_momentum=reset_momentum,
                                            verbose=0)
        callbacks.append(monitor)
    model.fit(x, y, batch_size=scenarios.SCENARIO["batch_size"], epochs=epochs, shuffle=False,
              verbose=0, callbacks=callbacks)
    val_loss = scenarios.val_mse(model, x_val, y_val)
    switch = monitor.clipping_events[0] if monitor and monitor.clipping_events else None
    return val_loss, switch


def rescue_table(seeds, logdir, epochs, out=print, reset_momentum=RESET_MOMENTUM, runs=tuple(RUNS)):
    """Trains every run (of `runs`) for every seed; returns `{run: [val MSE per seed]}`."""
    results = {name: [] for name in runs}
    out(f"{'seed':>4}  " + "  ".join(f"{name:>24}" for name in runs) + "  clipping on at (fixed / auto)")
    for seed in seeds:
        switches = []
        for name in runs:
            clip, auto_threshold = RUNS[name]
            run_dir = os.path.join(logdir, f"seed{seed}", name.replace(" ", "_").replace("=", "_"))
            val_loss, switch = train(seed, clip, auto_threshold, run_dir, epochs, reset_momentum)
            results[name].append(val_loss)
            if auto_threshold is not None:
                switches.append(f"{switch['step']} (t={switch['threshold']:.3g})" if switch else "-")
        out(f"{seed:>4}  " + "  ".join(f"{_fmt(results[n][-1]):>24}" for n in runs) + "  " + " / ".join(switches))
    return results


def _fmt(value):
    return f"{value:.4f}" if math.isfinite(value) else "NaN"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="gradwatch_logs/adding_problem")
    parser.add_argument("--epochs", type=int, default=scenarios.SCENARIO["epochs"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reset-momentum", choices=["on", "off"], default=None,
                        help="gradwatch's `reset_momentum` (default: gradwatch's default)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), metavar="RUN",
                        help=f"which runs (default: all of {list(RUNS)})")
    args = parser.parse_args(argv)
    reset = RESET_MOMENTUM if args.reset_momentum is None else args.reset_momentum == "on"
    rescue_table(args.seeds, args.logdir, args.epochs, reset_momentum=reset, runs=args.runs)
    print(f"(baseline: predicting the mean scores {scenarios.BASELINE_MSE:.4f})")
    print(f"\ntensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()

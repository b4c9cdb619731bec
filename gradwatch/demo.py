"""`gradwatch demo`: plain training that explodes, then gradwatch's rescue.

A recurrent network on the adding problem (Pascanu et al. 2013), generated in
code: trained first with plain SGD (gradients explode, the loss goes to NaN),
then the same model and data with `GradientMonitor(auto_clip=...)`, which
switches clipping on at the exploding step.
"""

import math
import os
import time

from gradwatch import tags


def default_logdir():
    """`./gradwatch_logs/demo-<date>-<time>`: a new folder for every run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join("gradwatch_logs", f"demo-{stamp}")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join("gradwatch_logs", f"demo-{stamp}-{suffix}")
    return path


def import_tensorflow_quietly():
    """Imports TensorFlow without its C++ start-up lines, unless the user set
    `TF_CPP_MIN_LOG_LEVEL`; returns whether it hid anything.

    `TF_CPP_MIN_LOG_LEVEL=3` (also hiding the harmless Grappler errors on the
    demo's ReLU RNN graph) does not hide the lines TensorFlow writes while it
    loads (absl's "All log messages before absl::InitializeLog() is called
    are written to STDERR" and cudart_stub's "Could not find cuda drivers",
    each printed twice on a machine without a GPU): they go to file descriptor
    2 before any setting is read. So descriptor 2 points to a temporary file
    during the import; if the import fails, what was written there is shown.
    """
    import sys
    import tempfile

    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                import tensorflow  # noqa: F401
            except BaseException:
                os.dup2(saved, 2)
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", "replace"))
                raise
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    return True


def run_demo(logdir, epochs, seed, out):
    """Trains both runs, prints alerts, a comparison and how to look. Returns 0."""
    import_tensorflow_quietly()
    import keras

    from gradwatch import scenarios
    from gradwatch.monitor import GradientMonitor

    settings = scenarios.SCENARIO
    epochs = epochs or settings["epochs"]
    x, y, x_val, y_val = scenarios.scenario_data(seed)
    out.write(f"gradwatch demo: a ReLU SimpleRNN on the adding problem (sequence length "
              f"{settings['seq_len']}, {len(x)} training sequences), SGD lr={settings['learning_rate']} "
              f"momentum={settings['momentum']}, {epochs} epochs, seed {seed}.\n"
              f"Logs: {os.path.abspath(logdir)}\n")
    runs = [("plain", {}), ("gradwatch_auto_clip", {"auto_clip": "global_clipnorm", "clip_threshold": 1.0})]
    results = []
    for name, monitor_args in runs:
        out.write(f"\n== {name}: " + ("plain SGD, monitored only\n" if not monitor_args else
                                       "GradientMonitor(auto_clip='global_clipnorm', clip_threshold=1.0)\n"))
        keras.utils.clear_session()
        keras.utils.set_random_seed(seed)  # same batches in both runs, and from one demo to the next
        model = scenarios.build_adding_model(seed, scenarios.default_optimizer())
        monitor = GradientMonitor(os.path.join(logdir, name), update_freq=10, verbose=1, **monitor_args)
        started = time.perf_counter()
        history = model.fit(x, y, validation_data=(x_val, y_val), batch_size=settings["batch_size"],
                            epochs=epochs, verbose=1,
                            callbacks=[monitor, keras.callbacks.TerminateOnNaN()])
        results.append(_summary(name, history, monitor, time.perf_counter() - started))
    _print_comparison(results, out)
    out.write(f"\nOpen the dashboard:\n  tensorboard --logdir {os.path.abspath(logdir)}\n"
              f"Or a text report (a CI gate with --fail-on-explosion):\n"
              f"  gradwatch report {os.path.abspath(logdir)}\n")
    return 0


def _summary(name, history, monitor, seconds):
    val_losses = history.history.get("val_loss") or [math.nan]
    losses = history.history.get("loss") or [math.nan]
    final = val_losses[-1] if len(val_losses) == len(losses) else math.nan
    first = monitor.explosions[0] if monitor.explosions else None
    switch = monitor.clipping_events[0]["step"] if monitor.clipping_events else None
    return {"run": name, "val_loss": final, "epochs": len(losses), "explosions": len(monitor.explosions),
            "first": first, "clip_step": switch, "seconds": seconds}


def _print_comparison(results, out):
    out.write("\n" + f"{'run':<22}{'epochs':>7}{'final val MSE':>15}{'explosions':>12}"
              f"{'first at step':>15}{'clipping on at':>16}{'time':>8}\n")
    for r in results:
        first = str(r["first"].step) if r["first"] else "-"
        clip = str(r["clip_step"]) if r["clip_step"] else "-"
        loss = "NaN (stopped)" if not math.isfinite(r["val_loss"]) else f"{r['val_loss']:.4f}"
        out.write(f"{r['run']:<22}{r['epochs']:>7}{loss:>15}{r['explosions']:>12}{first:>15}"
                  f"{clip:>16}{r['seconds']:>7.0f}s\n")
    out.write(f"(predicting the mean scores a val MSE of {1 / 6:.4f}; "
              f"TensorBoard tags: {tags.GLOBAL}, {tags.GLOBAL_CLIPPED}, {tags.PREFIX}<layer>, ...)\n")

"""One worker of the multi-worker test (`test_multiworker.py` starts two).

Usage: `TF_CONFIG=... python multiworker_worker.py <settings.json>`. Trains a
small tf_keras MLP under `MultiWorkerMirroredStrategy` with a GradientMonitor
(auto-clip on), then writes `<out_dir>/worker_<i>.npz` (weights before every
step and at the end) and `<out_dir>/worker_<i>.json` (explosions, clipping
events, alert records seen by the "gradwatch" logger, scratch folder).

The data and model builders are importable by the test (nothing runs on import).
"""

import json
import logging
import os
import sys

import numpy as np

FEATURES = 8


def make_data(steps, global_batch, spike_step, scale, seed=0):
    """Global batch `s` (from 1) is rows `(s-1)*global_batch : s*global_batch`;
    its targets are multiplied by `scale` at `spike_step`."""
    rng = np.random.default_rng(seed)
    n = steps * global_batch
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    y[(spike_step - 1) * global_batch:spike_step * global_batch] *= scale
    return x, y


def global_batch(x, y, step, size):
    return x[(step - 1) * size:step * size], y[(step - 1) * size:step * size]


def build_model(tf_keras):
    return tf_keras.Sequential([
        tf_keras.Input((FEATURES,)),
        tf_keras.layers.Dense(16, activation="tanh", name="hidden"),
        tf_keras.layers.Dense(1, name="out")], name="mlp")


class _AlertCounter(logging.Handler):
    def __init__(self):
        super().__init__()
        self.alerts = []

    def emit(self, record):
        if any(hasattr(record, k) for k in ("gradwatch_explosion", "gradwatch_burst", "gradwatch_clipping")):
            self.alerts.append(record.getMessage())


def main(settings_path):
    with open(settings_path) as f:
        settings = json.load(f)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import tf_keras

    import gradwatch

    task_id = strategy.cluster_resolver.task_id
    workers = strategy.num_replicas_in_sync
    steps, size = settings["steps"], settings["global_batch"]
    x, y = make_data(steps, size, settings["spike_step"], settings["scale"])

    def dataset_fn(context):
        per_replica = context.get_per_replica_batch_size(size)
        data = tf.data.Dataset.from_tensor_slices((x, y))
        data = data.shard(context.num_input_pipelines, context.input_pipeline_id)
        return data.batch(per_replica).repeat()

    tf_keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(tf_keras)
        model.compile(optimizer=tf_keras.optimizers.SGD(settings["learning_rate"]), loss="mse")

    snapshots = []

    class Snapshots(tf_keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            snapshots.append([v.numpy().copy() for v in model.trainable_variables])

    counter = _AlertCounter()
    logging.getLogger("gradwatch").addHandler(counter)
    monitor = gradwatch.GradientMonitor(
        settings["log_dir"], update_freq=settings["update_freq"], verbose=0,
        explosion_threshold=settings["explosion_threshold"], auto_clip="clipnorm",
        clip_threshold=settings["clip_threshold"])
    scratch = {}
    original_begin = monitor.on_train_begin

    def on_train_begin(logs=None):  # notes where this worker wrote, to check it is gone
        original_begin(logs)
        scratch["dir"] = monitor._role.scratch
    monitor.on_train_begin = on_train_begin

    model.fit(tf_keras.utils.experimental.DatasetCreator(dataset_fn), epochs=1, steps_per_epoch=steps,
              verbose=0, callbacks=[Snapshots(), monitor])

    final = [v.numpy() for v in model.trainable_variables]
    out = settings["out_dir"]
    arrays = {f"snap_{s}_{i}": w for s, weights in enumerate(snapshots) for i, w in enumerate(weights)}
    arrays.update({f"final_{i}": w for i, w in enumerate(final)})
    np.savez(os.path.join(out, f"worker_{task_id}.npz"), **arrays)
    report = {
        "task_id": task_id, "replicas": workers, "chief": monitor._role.chief,
        "scratch": scratch.get("dir"), "layer_paths": monitor.layer_paths,
        "explosions": [e.step for e in monitor.explosions],
        "clipping_events": monitor.clipping_events, "alerts": counter.alerts,
        "iterations": int(model.optimizer.iterations.numpy()), "steps_seen": len(snapshots),
    }
    with open(os.path.join(out, f"worker_{task_id}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])

"""`tf.distribute.MirroredStrategy`: norms and clipping of the all-reduced gradient.

Keras 3 clips each replica's gradient *before* the cross-replica sum; gradwatch
measures and clips the summed gradient, the one the update really uses. This
example splits the CPU into two logical devices to show it on any machine:
the logged norm equals the norm of the whole global batch on one device.

    python examples/mirrored_strategy.py
"""

import argparse
import os

import numpy as np
import tensorflow as tf


def use_two_cpu_devices():
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass  # TensorFlow already started: keep its devices
    return [d.name for d in tf.config.list_logical_devices("CPU")][:2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", default="gradwatch_logs/mirrored")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    devices = use_two_cpu_devices()
    import keras

    import gradwatch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    y[64 * 40:64 * 41] *= 1e4  # a corrupted global batch at step 41
    # Reduction to one device: TensorFlow's default collective all-reduce on
    # logical CPU devices is fragile; on GPUs keep the default.
    strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    print("replicas:", strategy.num_replicas_in_sync)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(32, activation="relu", name="hidden"),
                                  keras.layers.Dense(1, name="out")])
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    monitor = gradwatch.GradientMonitor(os.path.join(args.logdir, "run"), explosion_threshold=100.0,
                                        auto_clip="global_clipnorm", clip_threshold=5.0)
    model.fit(x, y, batch_size=64, epochs=args.epochs, shuffle=False, verbose=0, callbacks=[monitor])
    print("explosions:", [(e.step, e.action) for e in monitor.explosions][:5])
    print("global_clipnorm now:", model.optimizer.global_clipnorm)
    print(f"\ntensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()

"""Writes the logs of docs/culprits.png: a 16x16 image task, shuffled, three images x30 and one
label of 500, culprits=True. Then: python plugins/tensorboard_plugin_gradwatch/screenshot.py LOGDIR OUT.png
(the alerts panel, cropped)."""
import numpy as np, keras, gradwatch, sys
logdir = sys.argv[1]
rng = np.random.default_rng(0)
n = 768
labels = rng.integers(0, 2, n)
images = rng.normal(0, 0.3, size=(n, 16, 16, 1)).astype("float32")
for i in range(n):  # class 1: a bright square; class 0: a bright bar
    if labels[i]: images[i, 4:12, 4:12, 0] += 1.0
    else: images[i, 7:9, 2:14, 0] += 1.0
y = labels.astype("float32")[:, None] * 2 - 1
bad = [100, 420, 650]
images[bad] *= 30.0  # a sensor gone wild
y[333] = 500.0  # a corrupted label
keras.utils.set_random_seed(1)
model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                          keras.layers.Flatten(), keras.layers.Dense(1)])
model.compile(keras.optimizers.SGD(1e-3), "mse")
mon = gradwatch.GradientMonitor(logdir, culprits=True, update_freq=10, auto_clip="global_clipnorm", verbose=0)
model.fit(images, y, batch_size=32, epochs=2, shuffle=True, verbose=0, callbacks=[mon])
for e in mon.explosions: print(e.step, e.culprits and gradwatch.culprits.describe(e.culprits))
print(gradwatch.find_culprits(mon.explosions, images, y))

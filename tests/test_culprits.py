"""Culprits (issue 25): the exploding step's batch kept, its samples ranked,
checked against independent computations (`tf.GradientTape` on each sample
alone at the weights before the step; corrupted rows injected at known places)."""

import base64
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch.culprits import ranking
from helpers import WeightsBeforeEachStep

pytestmark = pytest.mark.core


def mlp(inputs=8):
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])


def data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x[:, :1] - x[:, 1:2]).astype("float32")


def train(tmp_path, model, x, y=None, *, lr=0.01, batch_size=16, shuffle=False, callbacks=(), fit_args=None,
          compile_args=None, optimizer=None, **monitor_args):
    model.compile(optimizer or keras.optimizers.SGD(lr), "mse", **(compile_args or {}))
    monitor_args.setdefault("verbose", 0)
    monitor_args.setdefault("culprits", "rank")
    monitor = gradwatch.GradientMonitor(str(tmp_path), **monitor_args)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=shuffle, verbose=0,
              callbacks=list(callbacks) + [monitor], **(fit_args or {}))
    return monitor


def tape_per_sample(model, weights, x, y, sample_weight=None):
    """Each sample alone: (loss, gradient norm) at `weights`, by `tf.GradientTape`."""
    current = [v.numpy() for v in model.trainable_variables]
    for v, w in zip(model.trainable_variables, weights):
        v.assign(w)
    loss_fn = keras.losses.MeanSquaredError()
    out = []
    size = len(tf.nest.flatten(x)[0])
    for i in range(size):
        xi = tf.nest.map_structure(lambda a: a[i:i + 1], x)
        with tf.GradientTape() as tape:
            sw = None if sample_weight is None else sample_weight[i:i + 1]
            loss = loss_fn(y[i:i + 1], model(xi, training=False), sample_weight=sw)
        grads = tape.gradient(loss, model.trainable_variables)
        out.append((float(loss), float(tf.linalg.global_norm(grads))))
    for v, w in zip(model.trainable_variables, current):
        v.assign(w)
    return out


def test_per_sample_norms_match_a_tape_on_each_sample_alone(tmp_path):
    x, y = data()
    y[70] = 400.0  # step 5 (batch 4, index 6)
    model = mlp()
    before = WeightsBeforeEachStep()
    monitor = train(tmp_path, model, x, y, callbacks=[before], update_freq=1000)
    first = monitor.explosions[0]
    assert first.step == 5
    bx, by, sw = first.batch()
    np.testing.assert_array_equal(bx, x[64:80])
    np.testing.assert_array_equal(by, y[64:80])
    assert sw is None
    expected = tape_per_sample(model, before.snapshots[4], bx, by)
    assert len(first.culprits) == 16
    for culprit in first.culprits:
        loss, norm = expected[culprit.index]
        assert culprit.loss == pytest.approx(loss, rel=1e-4)
        assert culprit.grad_norm == pytest.approx(norm, rel=1e-4)
    assert first.culprits[0].index == 6
    norms = [c.grad_norm for c in first.culprits]
    assert norms == sorted(norms, reverse=True)
    assert sum(c.share for c in first.culprits) == pytest.approx(1.0)


def test_dict_inputs_sample_weights_and_tf_data(tmp_path, caplog):
    x, y = data(128)
    y[37] = 400.0  # batch 2 (step 3), index 5
    weights = np.linspace(0.5, 1.5, 128).astype("float32")
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Dense(8, activation="tanh")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(h))
    inputs = {"a": x[:, :5], "b": x[:, 5:]}
    dataset = tf.data.Dataset.from_tensor_slices((inputs, y, weights)).batch(16)
    before = WeightsBeforeEachStep()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        monitor = train(tmp_path, model, dataset, callbacks=[before], update_freq=1000)
    first = monitor.explosions[0]
    assert first.step == 3
    bx, by, sw = first.batch()
    assert set(bx) == {"a", "b"}
    np.testing.assert_array_equal(bx["a"], x[32:48, :5])
    np.testing.assert_array_equal(sw, weights[32:48])
    expected = tape_per_sample(model, before.snapshots[2], bx, by, sw)
    for culprit in first.culprits:
        assert culprit.loss == pytest.approx(expected[culprit.index][0], rel=1e-4)
        assert culprit.grad_norm == pytest.approx(expected[culprit.index][1], rel=1e-4)
    assert first.culprits[0].index == 5
    line = next(r.getMessage() for r in caplog.records if "at step 3 " in r.getMessage())
    assert "sample 5 of the batch carries" in line
    # Found back in the dataset by content.
    assert gradwatch.find_culprits(monitor.explosions[:1], dataset).tolist() == [37]


def test_corrupted_rows_found_in_shuffled_data_at_their_steps(tmp_path):
    x, y = data(512, seed=1)
    corrupted = [41, 222, 400]
    y[corrupted] = 300.0
    x[333, 2] = np.nan
    keras.utils.set_random_seed(7)  # NaN row at step 13, after two corrupted rows
    model = mlp()
    monitor = train(tmp_path, model, x, y, lr=0.003, shuffle=True, batch_size=32)
    assert monitor.explosions
    by_step = gradwatch.find_culprits(monitor.explosions, x, y, by_step=True)
    nan_steps = [e.step for e in monitor.explosions if e.nonfinite]
    first_nan = min(nan_steps)
    # The NaN row is named first at the first NaN step.
    nan_explosion = next(e for e in monitor.explosions if e.step == first_nan)
    assert not nan_explosion.culprits[0].finite
    assert by_step[first_nan][0] == 333
    # Each finite explosion before the NaN names a corrupted row first, found at its step.
    finite = [e for e in monitor.explosions if e.step < first_nan and e.culprits]
    assert len(finite) >= 2
    for explosion in finite:
        assert by_step[explosion.step][0] in corrupted
    # One call, the indices in the user's arrays.
    found = gradwatch.find_culprits(monitor.explosions, x, y)
    assert 333 in found and set(found) <= set(corrupted + [333])


class LearningRateSpike(keras.callbacks.Callback):
    def __init__(self, at_batch, factor):
        super().__init__()
        self.at_batch, self.factor = at_batch, factor

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.at_batch:
            lr = self.model.optimizer.learning_rate
            self.saved = float(lr.numpy())
            lr.assign(self.saved * self.factor)
        elif batch == self.at_batch + 1:
            self.model.optimizer.learning_rate.assign(self.saved)


def test_learning_rate_spike_no_single_sample_dominates(tmp_path, caplog):
    x, y = data(512, seed=2)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        monitor = train(tmp_path, model, x, y, lr=0.01, batch_size=32,
                        callbacks=[LearningRateSpike(12, 3000.0)], update_freq=4)
    explosion = next(e for e in monitor.explosions if e.step == 14)
    assert ranking.dominant(explosion.culprits) is None
    line = next(r.getMessage() for r in caplog.records if "at step 14 " in r.getMessage())
    assert "no single sample dominates" in line
    assert gradwatch.find_culprits(explosion, x, y).tolist() == []


def test_by_default_nothing_is_kept_and_batch_says_why(tmp_path):
    x, y = data(64)
    y[40] = 400.0  # step 3
    model = mlp()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0)  # culprits=False
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    explosion = monitor.explosions[0]
    assert explosion.culprits is None
    with pytest.raises(gradwatch.BatchNotKeptError, match="was not kept"):
        explosion.batch()


def test_culprits_argument_is_validated():
    with pytest.raises(ValueError, match="`culprits` must be False, 'rank' or True. Received: culprits='yes'"):
        gradwatch.GradientMonitor("logs", culprits="yes")


def test_run_folder_and_report(tmp_path, capsys):
    import json
    import os

    from gradwatch import cli
    from gradwatch.culprits import store

    x, y = data(64)
    y[40] = 400.0  # step 3, index 8
    image_model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    images = np.repeat(x[:, :, None, None], 8, axis=2)
    monitor = train(tmp_path, image_model, images, y, culprits=True, update_freq=1000)
    explosion = next(e for e in monitor.explosions if e.step == 3)
    assert explosion.culprits[0].index == 8
    # The arrays file (culprits=True) holds the batch.
    path = os.path.join(tmp_path, "train", "culprits", "step-3.npz")
    bx, by, sw = store.load_batch(path)
    np.testing.assert_array_equal(bx, images[32:48])
    np.testing.assert_array_equal(by, y[32:48])
    # The report lists the culprits, in text and JSON.
    assert cli.main(["report", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    record = next(r for r in document["runs"][0]["explosions"]["records"] if r["step"] == 3)
    assert record["culprits"][0]["index"] == 8
    assert record["culprits"][0]["grad_norm"] == pytest.approx(explosion.culprits[0].grad_norm, rel=1e-6)
    assert "carries" in record["culprits_summary"]
    assert record["culprits_arrays"] == os.path.join("culprits", "step-3.npz")
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "step 3 culprits: #8 (loss" in capsys.readouterr().out
    # Previews (culprits=True): a PNG thumbnail of the image input, the target's value.
    from helpers import read_tags

    docs = [d for text in read_tags(str(tmp_path))["gradwatch/explosions"].values() for d in json.loads(text)]
    top = next(d for d in docs if d["step"] == 3)["culprits"][0]
    assert top["preview"]["inputs"][0]["kind"] == "image"
    assert base64.b64decode(top["preview"]["inputs"][0]["png"]).startswith(b"\x89PNG")
    assert top["preview"]["target"] == [400.0]


def test_rank_writes_the_ranking_but_no_sample_content(tmp_path):
    import json
    import os

    from helpers import read_tags

    x, y = data(64)
    y[40] = 400.0
    monitor = train(tmp_path, mlp(), x, y, update_freq=1000)
    assert monitor.explosions[0].culprits[0].index == 8
    assert not os.path.exists(os.path.join(tmp_path, "train", "culprits"))
    docs = [d for text in read_tags(str(tmp_path))["gradwatch/explosions"].values() for d in json.loads(text)]
    assert docs[0]["culprits"][0]["index"] == 8
    assert all("preview" not in c for d in docs for c in d["culprits"])


# -- everywhere gradwatch works -------------------------------------------------------


def _corrupted(n=128, at=70):
    x, y = data(n)
    y[at] = 400.0
    return x, y


def test_steps_per_execution_keeps_the_right_step(tmp_path):
    x, y = _corrupted()  # row 70: step 5, index 6
    model = mlp()
    before = WeightsBeforeEachStep()  # called once per execution: weights before steps 1, 5, ...
    monitor = train(tmp_path, model, x, y, callbacks=[before], compile_args={"steps_per_execution": 4},
                    update_freq=1000)
    explosion = next(e for e in monitor.explosions if e.step == 5)
    np.testing.assert_array_equal(explosion.batch()[0], x[64:80])
    assert explosion.culprits[0].index == 6
    expected = tape_per_sample(model, before.snapshots[1], *explosion.batch()[:2])
    assert explosion.culprits[0].grad_norm == pytest.approx(expected[6][1], rel=1e-4)


def test_mixed_precision(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    x, y = _corrupted()  # row 70: step 5, index 6
    # A small loss scale, so that the spike does not overflow float16 (the
    # loss-scale optimizer would skip that step: no explosion, nothing to keep).
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=1.0)
    monitor = train(tmp_path, mlp(), x, y, optimizer=optimizer, update_freq=1000)
    explosion = next(e for e in monitor.explosions if e.step == 5)
    assert explosion.culprits[0].index == 6
    assert gradwatch.find_culprits(explosion, x, y).tolist() == [70]


def test_xla_keeps_the_batch_also_a_partial_last_one(tmp_path):
    x, y = data(120)  # batches of 16, the last of 8 (Keras traces the step with a batch size of None)
    y[70] = 400.0  # step 5, index 6
    y[115] = 400.0  # step 8 (the partial batch), index 3
    model = mlp()
    before = WeightsBeforeEachStep()
    monitor = train(tmp_path, model, x, y, callbacks=[before], compile_args={"jit_compile": True},
                    update_freq=1000, explosion_threshold=50.0)
    assert model.jit_compile  # the user's setting is left as it was
    keeper = monitor._last_run[0][0].keeper
    assert keeper.xla  # the weights were copied inside the XLA-compiled step
    for step, rows, index in ((5, slice(64, 80), 6), (8, slice(112, 120), 3)):
        explosion = next(e for e in monitor.explosions if e.step == step)
        bx, by, sw = explosion.batch()
        np.testing.assert_array_equal(bx, x[rows])
        np.testing.assert_array_equal(by, y[rows])
        assert sw is None
        expected = tape_per_sample(model, before.snapshots[step - 1], bx, by)
        assert len(explosion.culprits) == len(bx)
        for culprit in explosion.culprits:
            assert culprit.loss == pytest.approx(expected[culprit.index][0], rel=1e-4)
            assert culprit.grad_norm == pytest.approx(expected[culprit.index][1], rel=1e-4)
        assert explosion.culprits[0].index == index


def test_mirrored_strategy_is_a_documented_limitation(tmp_path, caplog):
    from helpers import two_cpu_strategy

    strategy = two_cpu_strategy()
    x, y = _corrupted()
    y[100] = 400.0  # step 7 explodes too: the failure to keep is still logged once
    with strategy.scope(), caplog.at_level(logging.WARNING, logger="gradwatch"):
        model = mlp()
        monitor = train(tmp_path, model, x, y, update_freq=1000, explosion_threshold=50.0)
    explosion = next(e for e in monitor.explosions if e.step == 5)
    assert explosion.culprits is None
    with pytest.raises(gradwatch.BatchNotKeptError, match="distribution strategy"):
        explosion.batch()
    assert len(monitor.explosions) > 1
    assert sum("could not keep" in r.getMessage() for r in caplog.records) == 1
    assert monitor.model.history.history["loss"]  # training went on


class TinyGAN(keras.Model):
    """A GAN's custom train_step: its batch is real samples only (no loss to rank by)."""

    def __init__(self):
        super().__init__()
        self.generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
        self.discriminator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

    def train_step(self, real):
        noise = tf.random.normal([tf.shape(real)[0], 2])
        with tf.GradientTape() as tape:
            fake = self.generator(noise)
            loss = tf.reduce_mean(self.discriminator(fake)) - tf.reduce_mean(tf.square(self.discriminator(real)))
        grads = tape.gradient(loss, self.discriminator.trainable_variables)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_variables))
        with tf.GradientTape() as tape:
            loss_g = -tf.reduce_mean(self.discriminator(self.generator(noise)))
        grads = tape.gradient(loss_g, self.generator.trainable_variables)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_variables))
        return {"d": loss, "g": loss_g}


def test_custom_train_step_gan_keeps_the_batch(tmp_path):
    real = np.random.default_rng(0).normal(size=(128, 4)).astype("float32")
    real[70] = 300.0  # step 5 of the discriminator
    gan = TinyGAN()
    gan.compile(keras.optimizers.SGD(0.01), keras.optimizers.SGD(0.01))
    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0, update_freq=1000, culprits="rank")
    gan.fit(real, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[monitor])
    explosion = next(e for e in monitor.explosions if e.step == 5 and e.optimizer == "d_optimizer")
    x, y, sw = explosion.batch()
    np.testing.assert_array_equal(x, real[64:80])
    assert explosion.culprits is None  # no compiled loss: kept, not ranked
    assert "no compiled loss" in explosion.culprits_note


@pytest.mark.parametrize("jit_compile", [False, True])
def test_tf_keras(tmp_path, jit_compile):
    tf_keras = pytest.importorskip("tf_keras")
    x, y = _corrupted()
    model = tf_keras.Sequential([tf_keras.Input((8,)), tf_keras.layers.Dense(8, activation="tanh"),
                                 tf_keras.layers.Dense(1)])
    model.compile(tf_keras.optimizers.SGD(0.01), "mse", jit_compile=jit_compile)
    before = WeightsBeforeEachStep.__new__(WeightsBeforeEachStep)
    snapshots = []

    class Before(tf_keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            snapshots.append([v.numpy().copy() for v in self.model.trainable_variables])

    monitor = gradwatch.GradientMonitor(str(tmp_path), verbose=0, update_freq=1000, culprits="rank")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Before(), monitor])
    del before
    assert monitor._last_run[0][0].keeper.xla is jit_compile and model.jit_compile is jit_compile
    explosion = next(e for e in monitor.explosions if e.step == 5)
    assert explosion.culprits[0].index == 6
    bx, by, _ = explosion.batch()
    np.testing.assert_array_equal(bx, x[64:80])
    # Against a tape on each sample alone at the weights before step 5.
    current = [v.numpy() for v in model.trainable_variables]
    for v, w in zip(model.trainable_variables, snapshots[4]):
        v.assign(w)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(bx[6:7]) - by[6:7]))
    norm = float(tf.linalg.global_norm(tape.gradient(loss, model.trainable_variables)))
    for v, w in zip(model.trainable_variables, current):
        v.assign(w)
    assert explosion.culprits[0].grad_norm == pytest.approx(norm, rel=1e-4)


def test_ranking_doctests():
    import doctest

    from gradwatch.culprits import find, ranking as ranking_module

    assert doctest.testmod(ranking_module, raise_on_error=False).failed == 0
    assert doctest.testmod(find, raise_on_error=False).failed == 0


def test_a_storm_keeps_the_first_few_and_the_worst_few(tmp_path):
    from gradwatch.culprits import book

    x, y = data(640)  # 40 steps of 16, every one an explosion (threshold 1e-6)
    corrupted = {20: (19 * 16 + 3, 300.0), 30: (29 * 16 + 5, 600.0), 37: (36 * 16 + 7, 1000.0)}
    for row, value in corrupted.values():
        y[row] = value
    monitor = train(tmp_path, mlp(), x, y, lr=0.001, update_freq=1000, explosion_threshold=1e-6)
    assert [e.step for e in monitor.explosions] == list(range(1, 41))
    held = [e.step for e in monitor.explosions if e.culprits is not None and _held(e)]
    assert len(held) == book.FIRST_KEPT + book.WORST_KEPT
    assert held[:book.FIRST_KEPT] == list(range(1, book.FIRST_KEPT + 1))
    later = [e for e in monitor.explosions if e.step in held[book.FIRST_KEPT:]]
    assert {20, 30, 37} <= {e.step for e in later}  # the worst later ones (largest global norm)
    for step, (row, _) in corrupted.items():
        explosion = monitor.explosions[step - 1]
        assert explosion.culprits[0].index == row % 16
    others = [e for e in monitor.explosions if e.step not in held]
    ranked_then_dropped = [e for e in others if e.culprits is not None]
    assert len(ranked_then_dropped) <= 10  # of 32 later steps: ranked only when worse than the worst few then
    for explosion in others:
        with pytest.raises(gradwatch.BatchNotKeptError):
            explosion.batch()
    # Non-finite counts as worst; among equals the earlier stays.
    keeper = book.CulpritBook(None)
    records = [ranking.KeptRecord(data=i) for i in range(book.FIRST_KEPT + book.WORST_KEPT + 3)]
    norms = list(range(len(records)))
    norms[book.FIRST_KEPT] = norms[book.FIRST_KEPT + 1] = float("nan")
    for record, norm in zip(records, norms):
        if keeper.admits(norm):
            keeper._hold(record, norm)
    kept = [r.data for r in records if r.data is not None]
    assert kept == list(range(book.FIRST_KEPT)) + [8, 9] + kept[-2:] and kept[-2:] == [13, 14]
    assert keeper.floor() == 13.0


def _held(explosion):
    try:
        explosion.batch()
        return True
    except gradwatch.BatchNotKeptError:
        return False


def test_report_reads_hand_made_culprits(tmp_path, capsys):
    import json

    from gradwatch import cli, summaries, tags

    writer = summaries.EventWriter(str(tmp_path / "train"))
    writer.write_json(0, tags.LAYERS, ["dense"])
    for step in (1, 2, 3):
        writer.write_scalars(step, {tags.GLOBAL: 1.0, tags.layer_tag("dense"): 1.0})
    writer.write_json(3, tags.EXPLOSIONS, [{"step": 2, "global_norm": 50.0, "layers": [["dense", 50.0]],
                                           "action": "none", "culprits": [{"index": 4}, {"index": 1, "loss": "nan"}],
                                           "culprits_summary": "words\x1b[31m"}])
    writer.close()
    assert cli.main(["report", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["runs"][0]["explosions"]["records"][0]
    assert record["culprits"] == [{"index": 4, "loss": None, "grad_norm": None, "share": None},
                                  {"index": 1, "loss": "nan", "grad_norm": None, "share": None}]
    assert cli.main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "step 2 culprits: #4 (loss -, grad norm -, share -)" in text
    assert "\x1b" not in text


def test_batches_above_the_size_bound_keep_no_arrays_file(tmp_path, monkeypatch):
    import os

    from gradwatch.culprits import store

    x = np.arange(64, dtype=np.float32).reshape(8, 8)
    data = ({"a": x, "b": x[:, :2]}, x[:, :1], None)
    path = store.write_batch(str(tmp_path), 3, data)
    bx, by, sw = store.load_batch(path)
    np.testing.assert_array_equal(bx["b"], x[:, :2])
    np.testing.assert_array_equal(by, x[:, :1])
    assert sw is None
    monkeypatch.setattr(store, "ARRAYS_MAX_BYTES", x.nbytes)  # this batch is now above the bound
    assert store.write_batch(str(tmp_path), 4, data) is None
    assert not os.path.exists(os.path.join(tmp_path, store.FOLDER, "step-4.npz"))
    assert store.previews(data, [ranking.Culprit(2, 1.0, 1.0, 1.0)])[2]["target"] == [16.0]  # the preview stays

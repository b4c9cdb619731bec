"""keras-hub's own GPT-2 backbone (built from a small config, nothing downloaded):
LoRA rows and finer rows, each one layer of one transformer block, with norms
equal to those of `tf.GradientTape`. Not `core`: needs keras-hub."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradwatch
from gradwatch import stats, tags
from helpers import WeightsBeforeEachStep, layer_norm, layer_objects, read_tags

keras_hub = pytest.importorskip("keras_hub")

RTOL = 1e-5
SEQUENCE, BATCH, STEPS = 8, 4, 3


def gpt2(lora_rank=None):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=40, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=SEQUENCE, dropout=0.0)
    if lora_rank:
        backbone.enable_lora(rank=lora_rank)
    inputs = {"token_ids": keras.Input((SEQUENCE,), dtype="int32", name="token_ids"),
              "padding_mask": keras.Input((SEQUENCE,), dtype="int32", name="padding_mask")}
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(pooled))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(0, 40, size=(BATCH * STEPS, SEQUENCE)).astype("int32"),
         "padding_mask": np.ones((BATCH * STEPS, SEQUENCE), "int32")}
    return x, rng.normal(size=(BATCH * STEPS, 1)).astype("float32")


def fit_and_compare(model, tmp_path, **monitor_args):
    """Fits STEPS steps; every step's logged norms equal the tape's at that step's weights."""
    x, y = data()
    snapshots = WeightsBeforeEachStep()
    monitor = gradwatch.GradientMonitor(str(tmp_path), update_freq=2, verbose=0, **monitor_args)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[snapshots, monitor])
    logged = read_tags(str(tmp_path))
    layers = layer_objects(model, monitor.layer_paths)
    variables = model.trainable_variables
    for step, weights in enumerate(snapshots.snapshots, start=1):
        for variable, value in zip(variables, weights):
            variable.assign(value)
        batch = slice((step - 1) * BATCH, step * BATCH)
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(
                y[batch], model({k: v[batch] for k, v in x.items()}, training=True))
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]  # embedding rows summed
        norms = {id(v): float(tf.norm(g)) for v, g in zip(variables, grads)}
        np.testing.assert_allclose(logged[tags.GLOBAL][step], float(tf.linalg.global_norm(grads)), rtol=RTOL)
        for path, layer in layers.items():
            np.testing.assert_allclose(logged[tags.layer_tag(path)][step], layer_norm(norms, layer), rtol=RTOL)
    assert len(snapshots.snapshots) == STEPS
    return monitor


def test_lora_rows_are_the_trainable_query_and_value_layers(tmp_path):
    model = gpt2(lora_rank=4)
    monitor = fit_and_compare(model, tmp_path)
    assert monitor.layer_paths == [
        f"gpt2_backbone/transformer_layer_{i}/self_attention/{name}"
        for i in range(2) for name in ("query", "value")] + ["head"]
    # every LoRA variable is in exactly one row, that of the layer holding it
    paths, layer_of = stats.layer_paths(model)
    for variable in model.trainable_variables:
        assert paths[layer_of[id(variable)]].endswith(variable.path.rsplit("/", 1)[0])  # `path` is the backbone's


def test_sublayers_reports_attention_feed_forward_and_norms_apart():
    """The rows of each depth (no fit: the norms of finer rows are checked against a tape in
    tests/test_norms.py, on a plain-Keras block; here, which rows keras-hub's blocks give)."""
    model = gpt2()
    default, _ = stats.layer_paths(model)
    assert default == ["gpt2_backbone/token_embedding", "gpt2_backbone/position_embedding",
                       "gpt2_backbone/transformer_layer_0", "gpt2_backbone/transformer_layer_1",
                       "gpt2_backbone/layer_norm", "head"]
    block = ["self_attention", "self_attention_layer_norm", "feedforward_intermediate_dense",
             "feedforward_output_dense", "feedforward_layer_norm"]
    finer, layer_of = stats.layer_paths(model, sublayers=1)
    assert finer == (
        ["gpt2_backbone/token_embedding", "gpt2_backbone/position_embedding"]
        + [f"gpt2_backbone/transformer_layer_{i}/{name}" for i in range(2) for name in block]
        + ["gpt2_backbone/layer_norm", "head"])
    layers = layer_objects(model, finer)
    for variable in model.trainable_variables:  # each variable in the row of the sublayer holding it
        assert any(variable is held for held in layers[finer[layer_of[id(variable)]]].weights)
    finest, _ = stats.layer_paths(model, sublayers=2)
    assert len(finest) == 4 + 2 * 8 and "gpt2_backbone/transformer_layer_1/self_attention/key" in finest

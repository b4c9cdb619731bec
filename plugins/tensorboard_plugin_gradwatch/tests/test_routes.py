"""The plugin's HTTP routes, served by a real TensorBoard WSGI app over synthetic logs."""

import base64
import json
import re

import numpy as np
import pytest
from werkzeug.test import Client

from gradwatch import tags
from tensorboard_plugin_gradwatch import plugin, synthetic
from tensorboard_plugin_gradwatch.tests.conftest import make_app

PREFIX = "/data/plugin/gradwatch"


def get_json(client, path, status=200):
    response = client.get(PREFIX + path)
    assert response.status_code == status, response.get_data(as_text=True)
    return json.loads(response.get_data(as_text=True))


def cells_of(view):
    flat = np.frombuffer(base64.b64decode(view["cells"]), dtype="<f4")
    return flat.reshape(len(view["layers"]), view["columns"])


def test_listing_and_runs(client):
    listing = json.loads(client.get("/data/plugins_listing").get_data(as_text=True))
    assert listing["gradwatch"]["enabled"] is True
    assert listing["gradwatch"]["loading_mechanism"]["module_path"] == PREFIX + "/index.js"
    runs = get_json(client, "/runs")["runs"]
    assert runs == [{"name": tags.TRAIN_RUN, "last_step": synthetic.STEPS, "layers": len(synthetic.LAYERS)}]


def test_heatmap_one_column_per_step_holds_the_exact_norms(client, logdir):
    facts = logdir[1]
    view = get_json(client, "/heatmap?run=train&columns=4000")
    assert view["layers"] == list(synthetic.LAYERS)
    assert (view["first_step"], view["last_step"], view["bin_width"]) == (1, synthetic.STEPS, 1)
    cells = cells_of(view)
    row = synthetic.LAYERS.index("encoder/lstm_1")
    step = synthetic.EXPLOSION_STEP
    assert cells[row, step - 1] == np.float32(facts["norms"][step - 1, row])
    assert np.argmax(cells[row]) == step - 1
    assert np.isnan(cells[synthetic.LAYERS.index(synthetic.NAN_LAYER), synthetic.NAN_STEP - 1])


def test_heatmap_downsampled_max_equals_the_true_max(client, logdir):
    norms = logdir[1]["norms"].astype(np.float32)
    view = get_json(client, "/heatmap?run=train&columns=50")
    assert view["columns"] == 50 and view["bin_width"] == 12 and not view["sampled"]
    cells = cells_of(view)
    expected = norms.T.reshape(len(synthetic.LAYERS), 50, 12).max(axis=2)  # NaN propagates, as in the view
    np.testing.assert_array_equal(cells, expected)


def test_global_series_explosions_and_clipping(client, logdir):
    facts = logdir[1]
    view = get_json(client, "/global?run=train&points=10000")
    assert view["explosion_steps"] == facts["explosion_steps"] == [400, 430, 520]
    assert view["clipping_spans"] == [[facts["clipping_steps"][0], synthetic.STEPS]]
    assert view["overflow_steps"] == [synthetic.NAN_STEP]
    assert view["post_clip"]["steps"][0] == synthetic.EXPLOSION_STEP
    assert view["threshold"]["steps"][0] == synthetic.WARMUP + 1
    pre = dict(zip(view["pre_clip"]["steps"], view["pre_clip"]["values"]))
    assert pre[synthetic.NAN_STEP] == "NaN"  # TensorBoard's JSON spelling


def test_alerts_keep_every_flush_and_rank_layers(client):
    alerts = get_json(client, "/alerts?run=train")
    # 30 flushes of explosion records: more than TensorBoard's default 10 samples.
    assert [row["step"] for row in alerts["alerts"]] == [400, 430, 520]
    first = alerts["alerts"][0]
    assert first["action"] == tags.ACTION_CLIP_ON and first["top_layers"][0][0] == "encoder/lstm"
    assert alerts["alerts"][2]["action"] == tags.ACTION_SKIPPED
    assert [event["step"] for event in alerts["clipping"]] == [400]
    ranking = get_json(client, "/ranking?run=train&limit=3")["layers"]
    assert len(ranking) == 3 and all(row["times_top"] == 1 for row in ranking)


@pytest.mark.parametrize("path, status", [
    ("/heatmap?run=nope", 404),
    ("/alerts?run=plain", 404),
    ("/heatmap", 400),
    ("/heatmap?run=train&columns=abc", 400),
    ("/heatmap?run=train&columns=0", 400),
    ("/global?run=train&points=99999999", 400),
    ("/ranking?run=train&limit=-1", 400),
])
def test_errors(client, path, status):
    assert "error" in get_json(client, path, status)


def test_static_modules_are_served_with_every_import(client):
    index = client.get(PREFIX + "/index.js")
    assert index.status_code == 200 and "javascript" in index.headers["Content-Type"]
    for name in ("index.js", "chart.js", "heatmap.js", "tables.js", "layout.js", "format.js"):
        source = client.get(PREFIX + "/" + name).get_data(as_text=True)
        for imported in re.findall(r"from '\./([\w.]+)'", source):
            assert client.get(PREFIX + "/" + imported).status_code == 200, imported
    assert client.get(PREFIX + "/style.css").headers["Content-Type"].startswith("text/css")


def test_inactive_without_gradwatch_data(empty_logdir):
    app, _ = make_app(empty_logdir)
    client = Client(app)
    listing = json.loads(client.get("/data/plugins_listing").get_data(as_text=True))
    assert listing["gradwatch"]["enabled"] is False
    assert get_json(client, "/runs")["runs"] == []


def test_loader_keeps_all_gradwatch_samples_unless_told_otherwise(logdir):
    _, flags = make_app(logdir[0])
    assert flags.samples_per_plugin["gradwatch"] == 0
    _, flags = make_app(logdir[0], ["--samples_per_plugin", "gradwatch=5,scalars=100"])
    assert flags.samples_per_plugin == {"gradwatch": 5, "scalars": 100}


def test_loader_load_returns_the_plugin():
    from tensorboard.plugins import base_plugin

    class EmptyProvider:
        def list_scalars(self, *args, **kwargs):
            return {}

        list_tensors = list_scalars

    loaded = plugin.GradwatchPluginLoader().load(base_plugin.TBContext(data_provider=EmptyProvider()))
    assert isinstance(loaded, plugin.GradwatchPlugin)
    assert loaded.frontend_metadata().es_module_path == "/index.js"
    assert loaded.is_active() is False

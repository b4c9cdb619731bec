"""Every step from the `gradwatch/norms` blocks, with TensorBoard's default flags
(scalars sampled to 1000 per tag), through both loaders."""

import base64
import json

import numpy as np
import pytest
from werkzeug.test import Client

from gradwatch import state, summaries, tags, writing
from tensorboard_plugin_gradwatch import screenshot
from tensorboard_plugin_gradwatch.tests.conftest import make_app

STEPS = 2500
LAYERS = ["embed", "lstm", "head/dense"]
PREFIX = "/data/plugin/gradwatch"


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A run written as the monitor writes it (scalars per step, a block per drain of 100 steps)."""
    root = tmp_path_factory.mktemp("blocks")
    rng = np.random.default_rng(3)
    norms = rng.lognormal(0.0, 1.0, size=(STEPS, len(LAYERS))).astype(np.float32)
    global_norm = np.sqrt((norms.astype(np.float64) ** 2).sum(axis=1)).astype(np.float32)
    rows = np.zeros((STEPS, state.LAYERS_START + len(LAYERS)), np.float32)
    rows[:, state.GLOBAL] = global_norm
    rows[:, state.THRESHOLD] = np.inf
    rows[:, state.LAYERS_START:] = norms
    writer = summaries.EventWriter(str(root / "train"))
    writer.write_json(0, tags.LAYERS, LAYERS)
    layer_tags = [tags.layer_tag(path) for path in LAYERS]
    for start in range(0, STEPS, 100):
        steps = np.arange(start + 1, start + 101)
        events = writing.batch_events(steps, rows[start:start + 100], layer_tags, None, [], [], [])
        for _, write in events:
            write(writer)
    writer.close()
    return str(root), norms, global_norm


def check(heatmap, global_view, norms, global_norm, compared=None):
    if compared is not None:  # the comparison of runs shows every step too
        (run,) = compared["runs"]
        assert not compared["sampled"] and not run["sampled"] and run["stored_steps"] == STEPS
        np.testing.assert_array_equal(np.float32(run["pre_clip"]["values"]), global_norm)
    assert (heatmap["bin_width"], heatmap["columns"], heatmap["sampled"]) == (1, STEPS, False)
    cells = np.frombuffer(base64.b64decode(heatmap["cells"]), "<f4").reshape(len(LAYERS), STEPS)
    np.testing.assert_array_equal(cells, norms.T)
    assert not global_view["sampled"] and global_view["pre_clip"]["steps"] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(np.float32(global_view["pre_clip"]["values"]), global_norm)


def test_python_loader_default_flags(long_run):
    logdir, norms, global_norm = long_run
    client = Client(make_app(logdir)[0])

    def get(path):
        response = client.get(PREFIX + path)
        assert response.status_code == 200
        return json.loads(response.get_data(as_text=True))

    check(get("/heatmap?run=train&columns=4000"), get("/global?run=train&points=10000"), norms, global_norm,
          get("/compare?run=train&points=10000"))


@pytest.mark.skipif(not screenshot.chromium_available(), reason="runs with the browser tests")
def test_fast_loader_default_flags(long_run):
    logdir, norms, global_norm = long_run
    with screenshot.tensorboard(logdir, load_fast="true") as (base, _):
        get = lambda path: screenshot.fetch_json(base + PREFIX + path, timeout=60)  # noqa: E731
        check(get("/heatmap?run=train&columns=4000"), get("/global?run=train&points=10000"), norms, global_norm,
              get("/compare?run=train&points=10000"))

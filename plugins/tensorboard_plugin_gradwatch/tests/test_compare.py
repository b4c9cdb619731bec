"""Comparing runs: the /compare route over a sweep-like logdir (22 runs), and its pure logic."""

import json
from urllib.parse import quote

import numpy as np
import pytest
from werkzeug.test import Client

from gradwatch import tags
from tensorboard_plugin_gradwatch import compare, reader, synthetic
from tensorboard_plugin_gradwatch.tests.conftest import make_app

PREFIX = "/data/plugin/gradwatch"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    facts = synthetic.write_sweep(str(root))
    app, _ = make_app(str(root))
    return Client(app), facts


def get_json(client, query, status=200):
    response = client.get(PREFIX + "/compare?" + query)
    assert response.status_code == status, response.get_data(as_text=True)
    return json.loads(response.get_data(as_text=True)), len(response.get_data())


def runs_query(names):
    return "&".join("run=" + quote(name) for name in names)


def test_every_step_of_every_selected_run(sweep):
    client, facts = sweep
    names = sorted(facts)
    body, _ = get_json(client, runs_query(names) + "&points=1000")
    assert [run["name"] for run in body["runs"]] == names and body["missing"] == []
    assert (body["first_step"], body["last_step"], body["bin_width"]) == (1, 60, 1)
    for run in body["runs"]:
        expected = facts[run["name"]]
        assert run["pre_clip"]["steps"] == expected["steps"].tolist()
        assert run["pre_clip"]["values"] == expected["global"].astype(float).tolist()
        assert run["explosion_steps"] == expected["explosion_steps"]
        assert run["explosions"] == len(expected["explosion_steps"]) and not run["sampled"]


def test_binned_by_max_on_one_grid(sweep):
    client, facts = sweep
    names = ["clipping_sweep/trial_03/train", "clipping_sweep/trial_10/train"]
    body, _ = get_json(client, runs_query(names) + "&points=12")
    assert body["bin_width"] == 5
    for run in body["runs"]:
        expected = facts[run["name"]]["global"].reshape(12, 5).max(axis=1)
        assert run["pre_clip"]["steps"] == list(range(1, 61, 5))
        assert run["pre_clip"]["values"] == expected.astype(float).tolist()
    assert body["runs"][0]["explosion_steps"] == [40]


def test_unknown_and_plain_runs_are_listed_as_missing(sweep):
    client, _ = sweep
    body, _ = get_json(client, runs_query(["nope", "clipping_sweep/trial_01/train", "nope"]))
    assert [run["name"] for run in body["runs"]] == ["clipping_sweep/trial_01/train"]
    assert body["missing"] == ["nope"]
    body, _ = get_json(client, "run=nope")
    assert body == {"empty": True, "runs": [], "missing": ["nope"]}


@pytest.mark.parametrize("query", ["", "run=", "points=10", runs_query(["r%d" % i for i in range(101)]),
                                   "run=a&points=abc", "run=a&points=5"])
def test_bad_requests(sweep, query):
    body, _ = get_json(sweep[0], query, status=400)
    assert "error" in body


def test_response_size_is_bounded():
    steps = np.arange(1, 100_001, dtype=np.int64)
    series = {tags.GLOBAL: (steps, np.ones(steps.size, np.float32)),
              tags.GLOBAL_CLIPPED: (steps, np.ones(steps.size, np.float32))}
    data = reader.RunData(layers=[], series=series, explosions=[], clipping=[])
    view = compare.compare_view([("run_%d" % i, data) for i in range(100)], points=10000)
    assert view["points_capped"] and view["points"] == compare.MAX_VALUES // 200
    values = sum(len(run["pre_clip"]["values"]) + len(run["post_clip"]["values"]) for run in view["runs"])
    assert values <= compare.MAX_VALUES
    assert len(json.dumps(view)) < 6_000_000

"""The pure view logic on synthetic arrays, including a 100k-step x 200-layer run."""

import base64
import json

import numpy as np
import pytest

from gradwatch import tags
from tensorboard_plugin_gradwatch import reader, views


def run_data(layer_values, steps, extra=None, explosions=()):
    """RunData with one series per layer (rows of `layer_values`) at `steps`."""
    layers = ["block_%d/dense" % i for i in range(len(layer_values))]
    series = {tags.layer_tag(path): (steps, values.astype(np.float32))
              for path, values in zip(layers, layer_values)}
    series[tags.GLOBAL] = (steps, np.sqrt((layer_values.astype(np.float64) ** 2).sum(0)).astype(np.float32))
    series.update(extra or {})
    return reader.RunData(layers=layers, series=series, explosions=list(explosions), clipping=[])


def cells_of(view):
    flat = np.frombuffer(base64.b64decode(view["cells"]), dtype="<f4")
    return flat.reshape(len(view["layers"]), view["columns"])


@pytest.fixture(scope="module")
def big_run():
    rng = np.random.default_rng(1)
    steps = np.arange(1, 100_001, dtype=np.int64)
    values = np.exp(rng.standard_normal(size=(200, steps.size), dtype=np.float32))
    values[17, 54_321] = np.nan
    values[42, 77_777] = np.inf
    return run_data(values, steps), values


def test_big_heatmap_bins_by_max_and_stays_small(big_run):
    data, values = big_run
    view = views.heatmap_view(data, columns=500)
    assert view["columns"] == 500 and view["bin_width"] == 200
    assert view["layers"] == data.layers and not view["sampled"]
    cells = cells_of(view)
    np.testing.assert_array_equal(cells[3, 10], values[3, 2000:2200].max())
    np.testing.assert_array_equal(cells[199], values[199].reshape(500, 200).max(axis=1))
    assert np.isnan(cells[17, 54_320 // 200]) and np.isposinf(cells[42, 77_776 // 200])
    assert len(json.dumps(view)) < 600_000  # 200 x 500 float32 cells, base64


def test_big_global_and_ranking(big_run):
    data, values = big_run
    view = views.global_view(data, points=1000)
    assert len(view["pre_clip"]["steps"]) == 1000 and view["bin_width"] == 100
    ranking = views.ranking_view(data, limit=5)
    first_two = ranking["layers"][:2]
    assert {row["layer"] for row in first_two} == {"block_17/dense", "block_42/dense"}
    assert [row["nonfinite"] for row in first_two] == [1, 1] and ranking["total"] == 200
    assert len(json.dumps(ranking)) < 5_000


def test_sampled_steps_are_reported_and_binned():
    steps = np.array([1, 2, 5, 9, 10, 40], dtype=np.int64)
    values = np.array([[1.0, 3.0, 2.0, 8.0, 4.0, 0.5]])
    view = views.heatmap_view(run_data(values, steps), columns=100)
    assert view["sampled"] and view["stored_steps"] == 6
    assert view["columns"] == 6 and view["bin_width"] == 7  # no more bins than stored steps
    np.testing.assert_array_equal(cells_of(view)[0], [3.0, 8.0, -1.0, -1.0, -1.0, 0.5])


def test_nan_beats_inf_beats_finite_in_a_bin():
    steps = np.arange(1, 7, dtype=np.int64)
    values = np.array([[1.0, np.inf, np.nan, 2.0, np.inf, 3.0]])
    cells = cells_of(views.heatmap_view(run_data(values, steps), columns=3))
    assert np.isposinf(cells[0, 0]) and np.isnan(cells[0, 1]) and np.isposinf(cells[0, 2])


def test_clipping_spans_split_only_where_a_step_was_seen_without_clipping():
    clip = np.array([10, 12, 20, 30, 31], dtype=np.int64)
    seen = np.array([5, 10, 12, 20, 25, 30, 31], dtype=np.int64)  # 25 seen without clipping
    assert views.clipping_spans(clip, seen) == [[10, 20], [30, 31]]
    assert views.clipping_spans(np.zeros(0, np.int64), seen) == []


def test_alerts_fall_back_to_the_explosion_scalar():
    steps = np.arange(1, 11, dtype=np.int64)
    values = np.ones((2, 10))
    extra = {tags.EXPLOSION: (np.array([7], np.int64), np.array([1.0], np.float32))}
    alerts = views.alerts_view(run_data(values, steps, extra), limit=10)
    assert [row["step"] for row in alerts["alerts"]] == [7]
    assert alerts["alerts"][0]["global_norm"] == pytest.approx(np.sqrt(2.0))


def test_step_grid():
    assert views.step_grid(1, 600, 1000, 600) == (1, 600)
    assert views.step_grid(1, 100_000, 400, 1000) == (250, 400)
    assert views.step_grid(5, 5, 400, 1) == (1, 1)


def test_a_clip_threshold_that_follows_the_run_is_drawn_step_by_step():
    """`clip_threshold="auto"` writes the threshold in force every step (issue 13): the
    global view carries each value and one clipping span from the switch on."""
    steps = np.arange(1, 11, dtype=np.int64)
    values = np.array([[1.0, 2.0, 1.5, 50.0, 1.2, 1.1, 0.9, 1.3, 1.0, 0.8]])
    clip_steps = steps[3:]
    clip = np.array([0.9, 1.0, 1.05, 0.95, 1.0, 0.98, 0.93], np.float32)
    view = views.global_view(run_data(values, steps, extra={tags.CLIP_THRESHOLD: (clip_steps, clip)}), points=100)
    assert view["clip_threshold"]["steps"] == clip_steps.tolist()
    np.testing.assert_allclose(view["clip_threshold"]["values"], clip)
    assert view["clipping_spans"] == [[4, 10]]


def test_a_clipping_event_keeps_its_restart_step_only_as_an_integer_of_a_restart():
    from tensorboard_plugin_gradwatch import records

    base = {"step": 40, "mode": "global_clipnorm", "threshold": 0.5, "cause_step": 40, "restarted": True}
    assert records.clipping(dict(base, restart_step=17))["restart_step"] == 17
    for hostile in ["17<img src=x onerror=alert(1)>", 17.5, True, None, [17], 2 ** 70]:
        assert records.clipping(dict(base, restart_step=hostile))["restart_step"] is None
    clean = records.clipping(dict(base, restarted="yes", restart_step=17))
    assert clean["restarted"] is False and clean["restart_step"] is None

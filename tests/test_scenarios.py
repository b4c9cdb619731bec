import numpy as np
import pytest

from gradwatch import scenarios


def test_data_deterministic_per_seed():
    x1, y1 = scenarios.adding_problem(64, 12, seed=3)
    x2, y2 = scenarios.adding_problem(64, 12, seed=3)
    x3, _ = scenarios.adding_problem(64, 12, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_shapes_and_dtypes():
    x, y = scenarios.adding_problem(10, 7, seed=0)
    assert x.shape == (10, 7, 2) and x.dtype == np.float32
    assert y.shape == (10, 1) and y.dtype == np.float32
    with pytest.raises(ValueError):
        scenarios.adding_problem(10, 1, seed=0)


def test_target_is_sum_of_marked_values():
    x, y = scenarios.adding_problem(200, 20, seed=1)
    markers = x[:, :, 1]
    np.testing.assert_array_equal(markers.sum(axis=1), 2.0)
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert (markers[:, :10].sum(axis=1) == 1).all()  # one marker per half
    np.testing.assert_allclose(y[:, 0], (x[:, :, 0] * markers).sum(axis=1), rtol=1e-6)
    assert ((x[:, :, 0] >= 0) & (x[:, :, 0] < 1)).all()


def test_baseline_mse_is_one_sixth():
    _, y = scenarios.adding_problem(200_000, 10, seed=2)
    assert scenarios.BASELINE_MSE == pytest.approx(1 / 6)
    assert np.mean((y - 1.0) ** 2) == pytest.approx(1 / 6, rel=0.02)
    assert np.mean((y - y.mean()) ** 2) == pytest.approx(1 / 6, rel=0.02)


def test_plain_run_gradient_norm_spikes():
    s = scenarios.SCENARIO
    x, y, _, _ = scenarios.scenario_data(seed=2)
    model = scenarios.build_adding_model(seed=2)
    norms, _, spike = scenarios.train_with_grad_norms(
        model, x, y, epochs=2, batch_size=s["batch_size"], seed=2)
    assert spike is not None, "no spike within two epochs of plain training"
    before = np.median(norms[:spike])
    assert norms[spike] > 10 * before or not np.isfinite(norms[spike])
    # a jump, not a drift: the norm a few steps earlier was still ordinary
    assert np.all(norms[max(0, spike - 3):spike] < 5 * before)

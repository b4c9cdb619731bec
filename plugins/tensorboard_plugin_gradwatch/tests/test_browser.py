"""End to end: real `tensorboard` processes (both data loaders) and headless Chromium."""

import contextlib

import pytest

from tensorboard_plugin_gradwatch import screenshot

pytestmark = pytest.mark.skipif(
    not screenshot.chromium_available(), reason="needs /usr/bin/chromium and /usr/bin/chromedriver")

LOADERS = ("false", "true")  # --load_fast: the Python loader, RustBoard


@pytest.fixture(scope="module")
def boards(logdir):
    """One TensorBoard per loader over the synthetic logs, started together."""
    with contextlib.ExitStack() as stack:
        started = {}
        for load_fast in LOADERS:
            board = screenshot.TensorBoardProcess(logdir[0], load_fast=load_fast)
            stack.callback(board.stop)
            started[load_fast] = board.start()
        yield {load_fast: (board, board.wait_ready()) for load_fast, board in started.items()}


@pytest.fixture(scope="module")
def driver():
    with screenshot.chromium(width=1280, height=900) as browser:
        yield browser


@pytest.mark.parametrize("load_fast", LOADERS)
def test_dashboard_draws_heatmap_and_lists_the_explosion(driver, boards, load_fast):
    from selenium.webdriver.common.by import By

    board, listing = boards[load_fast]
    assert listing["gradwatch"]["enabled"] is True
    root = screenshot.open_dashboard(driver, board.base)
    assert root.get_attribute("data-state") == "ready"
    assert driver.find_element(By.ID, "gw-heatmap").get_attribute("data-drawn") == "true"
    assert driver.find_element(By.ID, "gw-global").get_attribute("data-drawn") == "true"
    rows = driver.find_elements(By.CSS_SELECTOR, "#gw-alerts tbody tr")
    # All three explosions, although they sit in 3 of 30 flushed samples.
    assert [row.get_attribute("data-step") for row in rows] == ["400", "430", "520"]
    rows[1].click()
    selected = driver.find_elements(By.CSS_SELECTOR, "#gw-alerts tbody tr.gw-selected")
    assert [row.get_attribute("data-step") for row in selected] == ["430"]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#gw-ranking tbody tr")) == 10


def test_empty_state_for_a_run_without_gradwatch_data(driver, boards):
    from selenium.webdriver.common.by import By

    board, _ = boards["false"]
    root = screenshot.open_dashboard(driver, board.base, fragment="#run=plain")
    assert root.get_attribute("data-state") == "empty"
    assert driver.find_element(By.ID, "gw-empty").text == "no gradwatch data in this run"

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


@pytest.fixture(scope="module")
def sweep_board(tmp_path_factory):
    """RustBoard over a sweep-like logdir of 22 runs."""
    from tensorboard_plugin_gradwatch import synthetic

    root = tmp_path_factory.mktemp("sweep_browser")
    facts = synthetic.write_sweep(str(root))
    with screenshot.tensorboard(str(root), load_fast="true") as (base, _):
        yield base, sorted(facts)


def legend_runs(driver):
    from selenium.webdriver.common.by import By

    items = driver.find_elements(By.CSS_SELECTOR, "#gw-compare-legend .gw-compare-item")
    return [(item.get_attribute("data-run"), item.find_element(By.CLASS_NAME, "gw-compare-name").text)
            for item in items]


def wait_for_lines(driver, count):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "const c = document.getElementById('gw-compare');"
        "return c.dataset.drawn === 'true' && !c.hidden && c.dataset.lines === arguments[0];", str(count)))


def test_compare_overlays_every_selected_run_with_a_legend(driver, sweep_board):
    from selenium.webdriver.common.by import By

    base, names = sweep_board
    screenshot.open_dashboard(driver, base)
    assert driver.find_element(By.ID, "gw-compare-card").is_displayed()
    wait_for_lines(driver, len(names))  # every run is selected at first
    assert legend_runs(driver) == [(name, name) for name in names]
    colors = driver.execute_script(
        "return [...document.querySelectorAll('#gw-compare-legend .gw-swatch')]"
        ".map((s) => getComputedStyle(s).getPropertyValue('--gw-color').trim())")
    assert len(set(colors)) == len(names)  # one colour per run
    driver.find_element(By.ID, "gw-select-none").click()
    box = driver.find_element(By.ID, "gw-run-filter")
    box.send_keys("trial_1")  # trial_10 .. trial_19
    shown = [item.get_attribute("data-run") for item in driver.find_elements(By.CSS_SELECTOR, ".gw-run-item")]
    assert shown == [name for name in names if "trial_1" in name] and len(shown) == 10
    driver.find_element(By.ID, "gw-select-all").click()
    wait_for_lines(driver, 10)
    assert [run for run, _ in legend_runs(driver)] == shown
    driver.find_elements(By.CSS_SELECTOR, ".gw-run-item input")[0].click()  # unselect trial_10
    wait_for_lines(driver, 9)
    assert [run for run, _ in legend_runs(driver)] == shown[1:]
    assert driver.find_element(By.ID, "gw-run-count").text == "9 of 22 runs selected, 10 match the filter"
    driver.find_elements(By.CSS_SELECTOR, "#gw-compare-legend .gw-compare-item")[2].click()  # details of trial_12
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "gw-root").get_attribute("data-state") == "ready"
                                    and d.find_element(By.ID, "gw-run").get_attribute("value") == shown[3])

"""End to end: real `tensorboard` processes (both data loaders) and headless Chromium."""

import contextlib

import pytest

from tensorboard_plugin_gradwatch import screenshot

pytestmark = [
    pytest.mark.skipif(not screenshot.chromium_available(),
                       reason="needs /usr/bin/chromium, /usr/bin/chromedriver and selenium"),
    # One Chromium and the module's TensorBoards for every test: one pytest-xdist worker
    # (`--dist loadgroup`, pyproject.toml).
    pytest.mark.xdist_group("test_browser"),
]

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
    # The culprits of the first explosion (issue 25): ranked samples, a thumbnail, values.
    culprits = driver.find_elements(By.CSS_SELECTOR, "#gw-alerts tbody tr")[0].find_elements(
        By.CSS_SELECTOR, ".gw-culprit")
    assert [c.find_element(By.CSS_SELECTOR, ".gw-culprit-index").text for c in culprits] == ["#17", "#3"]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#gw-alerts img.gw-thumb")) == 1
    assert "x: [0.1, -0.4, 2]" in culprits[1].text


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


EVIL_RUN = "evil\u202e\u009b<img src=x onerror=window.__gw_xss=1>"
EVIL_LAYER = "\u202eevil\u200f<script>window.__gw_xss=2</script>"


def write_small_run(run_dir, layers, steps=20, explode_step=10):
    from gradwatch import summaries, tags

    writer = summaries.EventWriter(run_dir)
    writer.write_json(0, tags.LAYERS, layers)
    for step in range(1, steps + 1):
        norm = 1000.0 if step == explode_step else 1.0 + step / 10
        writer.write_scalars(step, dict({tags.layer_tag(name): norm for name in layers}, **{tags.GLOBAL: norm}))
    # Hostile culprits (issue 25): markup in the words and names, a "PNG" that is not one.
    culprits = [{"index": 0, "loss": 1e4, "grad_norm": 5.0, "share": 1.0,
                 "preview": {"inputs": [{"name": "x", "kind": "image", "png": 'iVBORw0KGgo" onerror="window.__gw_xss=5'},
                                        {"name": "<img src=x onerror=window.__gw_xss=4>", "kind": "values",
                                         "values": [1, 2]}], "target": [3]}}]
    writer.write_json(steps, tags.EXPLOSIONS, [{"step": explode_step, "epoch": 0, "global_norm": 1000.0,
                                                "threshold": 10.0, "layers": [[layers[1], 1000.0]],
                                                "action": "none", "culprits": culprits,
                                                "culprits_summary": "<img src=x onerror=window.__gw_xss=3>"}])
    writer.close()


@pytest.fixture(scope="module")
def hostile_board(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_browser")
    write_small_run(str(root / EVIL_RUN), ["lstm", EVIL_LAYER, "embed"])
    write_small_run(str(root / "long_names"), ["lstm", "n" * 20_000, "x" * 1_000_000 + "tail"])
    write_short_run(str(root / "short"))  # test_short_run_...: one TensorBoard for both
    with screenshot.tensorboard(str(root), load_fast="true") as (base, _):
        yield base


def test_hostile_names_render_as_text_and_long_names_draw(driver, hostile_board):
    from urllib.parse import quote

    from selenium.webdriver.common.by import By

    root = screenshot.open_dashboard(driver, hostile_board, fragment="#run=" + quote(EVIL_RUN))
    assert root.get_attribute("data-state") == "ready"
    assert driver.execute_script("return window.__gw_xss === undefined && !document.querySelector('img, script[src]')")
    options = [option.text for option in driver.find_elements(By.CSS_SELECTOR, "#gw-run option")]
    assert "evil\\u{202e}\\u{9b}<img src=x onerror=window.__gw_xss=1>" in options
    legend = driver.find_elements(By.CSS_SELECTOR, "#gw-compare-legend .gw-compare-name")
    assert "evil\\u{202e}\\u{9b}<img src=x onerror=window.__gw_xss=1>" in [item.text for item in legend]
    ranking = [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "#gw-ranking td.gw-layer-name")]
    assert "\\u{202e}evil\\u{200f}<script>window.__gw_xss=2</script>" in ranking
    chips = driver.find_elements(By.CSS_SELECTOR, "#gw-alerts .gw-layer-name")
    assert chips[0].text == "\\u{202e}evil\\u{200f}<script>window.__gw_xss=2</script>"
    summary = driver.find_element(By.CSS_SELECTOR, "#gw-alerts .gw-culprit-summary")
    assert summary.text == "<img src=x onerror=window.__gw_xss=3>"  # text, and no image anywhere (above)
    assert "<img src=x onerror=window.__gw_xss=4>: [1, 2]" in driver.find_element(
        By.CSS_SELECTOR, "#gw-alerts .gw-culprit").text
    root = screenshot.open_dashboard(driver, hostile_board, fragment="#run=long_names")
    assert root.get_attribute("data-state") == "ready"
    assert driver.find_element(By.ID, "gw-heatmap").get_attribute("data-drawn") == "true"
    assert driver.execute_script("return window.__gw_xss === undefined")


def write_short_run(run_dir, steps=8):
    """A short run with `auto_clip` set and clipping never on: the after-clipping norm is the
    before-clipping one; each step's norm differs, so each heat-map cell has its own colour."""
    from gradwatch import summaries, tags

    writer = summaries.EventWriter(run_dir)
    writer.write_json(0, tags.LAYERS, ["dense", "out"])
    for step in range(1, steps + 1):
        norm = 2.0 ** step
        writer.write_scalars(step, {tags.layer_tag("dense"): norm, tags.layer_tag("out"): norm / 3,
                                    tags.GLOBAL: norm, tags.GLOBAL_CLIPPED: norm})
    writer.close()


PAGE_WIDTHS = "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"


@pytest.mark.parametrize("width", [1280, 1600])
def test_dashboard_fits_the_window_without_horizontal_scrollbar(driver, boards, hostile_board, width):
    board, _ = boards["true"]
    driver.set_window_size(width, 900)
    try:
        assert driver.execute_script("return window.innerWidth") == width
        for base, fragment in ((board.base, ""), (hostile_board, "#run=short"), (hostile_board, "#run=long_names")):
            screenshot.open_dashboard(driver, base, fragment=fragment)
            scroll, client = driver.execute_script(PAGE_WIDTHS)
            assert scroll == client, (fragment, width, scroll, client)
    finally:
        driver.set_window_size(1280, 900)


def test_short_run_has_whole_step_ticks_cells_on_steps_and_both_clipping_lines(driver, hostile_board):
    from selenium.webdriver.common.by import By

    screenshot.open_dashboard(driver, hostile_board, fragment="#run=short")
    heatmap = driver.find_element(By.ID, "gw-heatmap")
    global_chart = driver.find_element(By.ID, "gw-global")
    for canvas in (heatmap, global_chart):
        assert canvas.get_attribute("data-ticks").split() == [str(step) for step in range(1, 9)]
    left, plot_width, top = (float(v) for v in heatmap.get_attribute("data-plot").split())
    # Every step's cell (row "dense") is one colour from just after its start to just before its end,
    # and neighbouring steps differ: cells sit on whole steps.
    colours = driver.execute_script("""
        const [canvas, left, width, top] = arguments;
        const ratio = canvas.width / canvas.getBoundingClientRect().width;
        const ctx = canvas.getContext('2d');
        const at = (x) => Array.from(ctx.getImageData(Math.round(x * ratio), Math.round((top + 5) * ratio), 1, 1).data);
        const out = [];
        for (let step = 1; step <= 8; step++) {
          const x0 = left + ((step - 1) / 8) * width, x1 = left + (step / 8) * width;
          out.push([at(x0 + 2), at((x0 + x1) / 2), at(x1 - 2)]);
        }
        return out;""", heatmap, left, plot_width, top)
    for start, middle, end in colours:
        assert start == middle == end
    assert len({tuple(middle) for _, middle, _ in colours}) == 8
    # Before and after clipping coincide: the blue pre-clip line lies on a wider green one.
    # Read in one script: a resize redraw (drawCharts, debounced) replaces the legend's items with
    # the same ones, and items found first and read one by one can go stale in between (seen under load).
    legend = driver.execute_script(
        "return [...document.querySelectorAll('#gw-global-legend .gw-legend-item')].map((i) => i.innerText.trim())")
    assert legend[:2] == ["global norm, before clipping", "after clipping (wide, under)"]
    blue, green = driver.execute_script("""
        const canvas = arguments[0], left = arguments[1], width = arguments[2];
        const ratio = canvas.width / canvas.getBoundingClientRect().width;
        const ctx = canvas.getContext('2d');
        const x = Math.round((left + (4.5 / 8) * width) * ratio);  // mid-step 5, on the lines
        const column = ctx.getImageData(x, 0, 1, canvas.height).data;
        let blue = 0, green = 0;
        for (let i = 0; i < column.length; i += 4) {
          const [r, g, b] = [column[i], column[i + 1], column[i + 2]];
          if (b > 180 && r < 90 && g < 150) blue++;
          if (g > r + 30 && g > b + 20) green++;
        }
        return [blue, green];""", global_chart, left, plot_width)
    assert blue >= 1 and green >= 2, (blue, green)

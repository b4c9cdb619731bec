"""Screenshot of the gradwatch dashboard, and the browser helpers the end-to-end test uses.

    python plugins/tensorboard_plugin_gradwatch/screenshot.py LOGDIR OUT.png [--synthetic]

Starts TensorBoard on LOGDIR (127.0.0.1, a free port), opens the plugin page in
headless Chromium, waits until the heat map is drawn, marks the first alert's
step and saves a full-page PNG. `--synthetic` first writes a synthetic run into
LOGDIR. Needs selenium and Debian's chromium + chromium-driver.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STARTUP_TIMEOUT = 60
PLUGIN_PAGE = "/data/plugin_entry.html?name=gradwatch"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def _wait_for_plugin(base, process, deadline, enabled):
    """Polls /data/plugins_listing until gradwatch is listed (and enabled, if asked)."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("tensorboard exited with code %s" % process.returncode)
        try:
            listing = fetch_json(base + "/data/plugins_listing")
            if "gradwatch" in listing and (listing["gradwatch"]["enabled"] or not enabled):
                return listing
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError("tensorboard did not list gradwatch as enabled in time")


class TensorBoardProcess:
    """A `tensorboard` child process on 127.0.0.1 and a free port.

    `start()` returns at once (start several, then wait for each); `wait_ready()`
    waits until gradwatch is listed (and enabled, if asked); `stop()` always ends it.
    """

    def __init__(self, logdir, load_fast="false", extra_args=()):
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        self.command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir,
                        "--host", "127.0.0.1", "--port", str(self.port), "--load_fast", load_fast,
                        "--reload_interval", "0", *extra_args]
        self.process = None
        self._log = None

    def start(self):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        return self

    def wait_ready(self, enabled=True):
        """The plugins listing, once gradwatch is in it; prints TensorBoard's log on failure."""
        try:
            return _wait_for_plugin(self.base, self.process, time.monotonic() + STARTUP_TIMEOUT, enabled)
        except Exception:
            self._log.seek(0)
            sys.stderr.write(self._log.read().decode("utf-8", "replace")[-4000:])
            raise

    def stop(self):
        if self.process is not None:
            _stop(self.process)
        if self._log is not None:
            self._log.close()


@contextlib.contextmanager
def tensorboard(logdir, load_fast="false", extra_args=(), wait_for_plugin=True):
    """Runs TensorBoard on 127.0.0.1; yields (base URL, plugins listing). Always stops it.

    With `wait_for_plugin`, waits until gradwatch is enabled (the data is loaded).
    """
    board = TensorBoardProcess(logdir, load_fast, extra_args)
    try:
        board.start()
        yield board.base, board.wait_ready(enabled=wait_for_plugin)
    finally:
        board.stop()


def _stop(process):
    """Stops `process` and its process group (TensorBoard's data server child)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def chromium_available():
    """Chromium, its driver and selenium are all installed (the browser tests skip otherwise)."""
    import importlib.util

    return (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
            and importlib.util.find_spec("selenium") is not None)


@contextlib.contextmanager
def chromium(width=1400, height=1000):
    """A headless Chromium selenium driver with a fresh profile. Always quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gw-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 "--user-data-dir=" + profile, "--window-size=%d,%d" % (width, height)):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_dashboard(driver, base, fragment="", timeout=30):
    """Loads the plugin page and waits until the heat map is drawn (or the empty state shows)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")  # a fresh document even when only the #fragment changes
    driver.get(base + PLUGIN_PAGE + fragment)
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "const r = document.getElementById('gw-root');"
        "return r && (r.dataset.state === 'empty' || r.dataset.state === 'error' ||"
        " (document.getElementById('gw-heatmap').dataset.drawn === 'true'));"))
    return driver.find_element(By.ID, "gw-root")


def save_screenshot(logdir, out_path, select_first_alert=True, width=1400):
    """Full-page PNG of the dashboard for `logdir` at `out_path`."""
    from selenium.webdriver.common.by import By

    with tensorboard(logdir) as (base, _), chromium(width=width) as driver:
        open_dashboard(driver, base)
        rows = driver.find_elements(By.CSS_SELECTOR, "#gw-alerts tbody tr")
        if select_first_alert and rows:
            rows[0].click()
        height = driver.execute_script(
            "window.scrollTo(0, 0); document.documentElement.style.overflow = 'hidden';"
            "return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.5)  # let the resize redraw settle
        driver.save_screenshot(out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--synthetic", action="store_true", help="first write a synthetic run into LOGDIR")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    if args.synthetic:
        from gradwatch import tags
        from tensorboard_plugin_gradwatch import synthetic
        synthetic.write_run(os.path.join(args.logdir, tags.TRAIN_RUN))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_screenshot(args.logdir, args.out, width=args.width)
    print("wrote", args.out)


if __name__ == "__main__":
    main()

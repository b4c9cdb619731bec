"""TensorBoard at 100k steps x 200 layers (issue 15 item 1): `resources.py --part tensorboard`.

Writes the run with gradwatch's real host path (`resources.run_synthetic`:
Recorder + EventWriter, update_freq=100, so one `gradwatch/norms` block per
100 steps besides the per-step scalars), then for each configuration starts a
real `tensorboard` on it and measures: the time until the plugin's `/global`
answers with every step (last step 100k, `"sampled": false`), the peak RSS of
TensorBoard's process group (RustBoard's data server included, sampled every
0.5 s), and each route's time (first call, then cached). Configurations: the
fast loader with default flags and with `--samples_per_plugin=scalars=0`, and
the Python loader with default flags. Each has a time limit and an RSS limit
(it is stopped past them, and the table says so). Also: event-file bytes per
step per layer with the scalar encoding before this change (rank-0 tensors)
and now (`simple_value` + blocks), and `gradwatch report` time and peak RSS.
The files are deleted at the end.
"""

import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "plugins"))

from tensorboard_plugin_gradwatch import screenshot  # noqa: E402

ROUTES = ("/heatmap?run=train&columns=1000", "/global?run=train&points=1000",
          "/alerts?run=train&limit=2000", "/ranking?run=train&limit=10", "/compare?run=train&points=1000")
PREFIX = "/data/plugin/gradwatch"


def group_rss(pgid):
    """Total RSS in bytes of the processes in process group `pgid`."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def timed_get(url, timeout):
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    return time.perf_counter() - start, json.loads(body), len(body)


def measure(logdir, steps, load_fast, extra_args, time_limit, rss_limit):
    """One TensorBoard configuration; a dict of what was measured."""
    board = screenshot.TensorBoardProcess(logdir, load_fast=load_fast, extra_args=extra_args)
    result = {"loader": "fast" if load_fast == "true" else "python", "flags": " ".join(extra_args) or "default"}
    peak, stop = [0], threading.Event()
    start = time.monotonic()
    board.start()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], group_rss(board.process.pid))
            if peak[0] > rss_limit:
                result["stopped"] = f"RSS over {rss_limit / 2**30:.0f} GB"
                board.stop()
                return
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        while time.monotonic() - start < time_limit and "stopped" not in result:
            if board.process.poll() is not None:
                result.setdefault("stopped", f"exited ({board.process.returncode})")
                break
            try:
                _, body, _ = timed_get(board.base + PREFIX + "/global?run=train&points=1000", timeout=60)
                if body.get("last_step") == steps:
                    result["first_data_s"] = time.monotonic() - start
                    result["sampled"] = body["sampled"]
                    break
            except (OSError, ValueError) as error:
                result["last_error"] = str(error)[:200]
            time.sleep(1.0)
        else:
            result.setdefault("stopped", f"no full answer within {time_limit} s")
        if "first_data_s" in result:
            for route in ROUTES:
                first, body, size = timed_get(board.base + PREFIX + route, timeout=120)
                again, _, _ = timed_get(board.base + PREFIX + route, timeout=120)
                result[route.split("?")[0]] = (first, again, size)
            _, heat, _ = timed_get(board.base + PREFIX + ROUTES[0], timeout=120)
            result["heatmap_sampled"] = heat["sampled"]
            result["rss_after_routes"] = group_rss(board.process.pid)
    finally:
        stop.set()
        sampler.join(timeout=5)
        board.stop()
    result["peak_rss"] = peak[0]
    return result


def bytes_per_step_per_layer(layers, log_root):
    """Event-file bytes per step per layer: old scalar encoding (rank-0 tensors, no blocks) vs now."""
    import numpy as np

    from gradwatch import state, summaries, tags, writing

    steps = 2000
    rows = np.zeros((steps, state.LAYERS_START + layers), np.float32)
    rows[:, state.GLOBAL], rows[:, state.THRESHOLD] = 1.5, 4.0
    rows[:, state.LAYERS_START:] = np.random.default_rng(0).lognormal(size=(steps, layers))
    layer_tags = [tags.layer_tag(f"dense_{i + 1}") for i in range(layers)]
    sizes = {}
    old_value = summaries.encode_scalar_value
    head = b"\x08\x01\x12\x00\x2a\x04"  # TensorProto{dtype: DT_FLOAT, shape: {}, float_val: [4 bytes]}

    def tensor_scalar(tag, value, with_metadata):  # the encoding before this change
        body = summaries._length_delimited(1, tag.encode())
        if with_metadata:
            body += summaries._length_delimited(9, summaries._SCALAR_METADATA)
        return body + summaries._length_delimited(8, head + summaries._FLOAT.pack(value))

    for name, encode, blocks, drain in (("before (tensor scalars)", tensor_scalar, False, 100),
                                        ("now, update_freq=100", old_value, True, 100),
                                        ("now, update_freq=1", old_value, True, 1)):
        summaries.encode_scalar_value = encode
        writer = summaries.EventWriter(os.path.join(log_root, "bytes_" + str(len(sizes))))
        try:
            for first in range(0, steps, drain):
                events = writing.batch_events(np.arange(first + 1, first + drain + 1), rows[first:first + drain],
                                              layer_tags, None, [], [], [])
                for step, write in events:
                    if blocks or step is not None:
                        write(writer)
        finally:
            summaries.encode_scalar_value = old_value
            writer.close()
        sizes[name] = os.path.getsize(writer.path) / steps / layers
    return sizes


def report_run(logdir):
    """(seconds, peak RSS bytes) of `gradwatch report --json LOGDIR` in a child process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gradwatch.cli", "report", logdir, "--json"],
                   stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def tensorboard_part(args, log_root, run_synthetic, common):
    steps, layers = args.steps, 200
    lines = []
    sizes = bytes_per_step_per_layer(layers, log_root)
    logdir = os.path.join(log_root, "tb")
    written = run_synthetic(steps, layers, 100, max(steps // 10, 100), False, logdir)
    lines.append(f"{steps} steps x {layers} layers written by Recorder + EventWriter (update_freq=100) in "
                 f"{written['seconds']:.0f} s: {common.mb(written['file']):.0f} MB of events.")
    lines.append("")
    lines.append(common.markdown_table(["event-file bytes per step per layer", "value"],
                                       [[name, f"{value:.2f}"] for name, value in sizes.items()]))
    lines.append("")
    seconds, rss = report_run(logdir)
    lines.append(f"`gradwatch report --json`: {seconds:.1f} s, peak RSS {common.mb(rss):.0f} MB.")
    lines.append("")
    configs = [("true", [], args.tb_time_limit), ("true", ["--samples_per_plugin", "scalars=0"], args.tb_time_limit),
               ("false", [], args.python_time_limit)]
    rows = []
    for load_fast, extra, limit in configs:
        result = measure(logdir, steps, load_fast, extra, limit, args.rss_limit_gb * 2**30)
        print(json.dumps(result), flush=True)
        route_cells = []
        for route in ROUTES:
            timing = result.get(route.split("?")[0])
            route_cells.append("-" if timing is None else f"{timing[0]:.2f} / {timing[1]:.2f} s ({timing[2] // 1000} kB)")
        rows.append([result["loader"], result["flags"],
                     f"{result['first_data_s']:.0f} s" if "first_data_s" in result else result.get("stopped", "-"),
                     str(result.get("sampled", "-")).lower(), f"{common.mb(result['peak_rss']):.0f} MB",
                     *route_cells])
    lines.append(common.markdown_table(
        ["loader", "flags", "every step shown after", "sampled", "peak RSS (TensorBoard + data server)",
         *[f"`{route.split('?')[0]}` first / cached (size)" for route in ROUTES]], rows))
    return "\n".join(lines)

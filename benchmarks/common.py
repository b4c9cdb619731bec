"""Shared helpers of the benchmarks: machine description, markdown tables,
linear fits, resident memory."""

import datetime
import os
import platform
import statistics


def quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def machine_info():
    """One line: date, cores, CPU model, load, and the versions that matter."""
    import keras
    import tensorboard
    import tensorflow as tf

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = "%.1f" % os.getloadavg()[0]
    except OSError:
        load = "?"
    return (f"{datetime.date.today().isoformat()}; nproc {os.cpu_count()}, {cpu}; "
            f"load average {load} at start; Python {platform.python_version()}, "
            f"tensorflow {tf.__version__}, keras {keras.__version__}, "
            f"tensorboard {tensorboard.__version__}")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def linear_fit(xs, ys):
    """Least-squares `(slope, intercept)` of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def rss_bytes():
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """Peak resident set size of this process so far (VmHWM, Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def mb(n_bytes):
    return n_bytes / 1e6

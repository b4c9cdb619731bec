"""Pure logic of the run comparison: the global norms of several runs on one step grid.

The `/compare` route serves it; like `views`, no I/O here. Every run is binned
by MAX on the same grid (bins of `bin_width` steps from the first step of all
runs), so the curves line up; a run's explosion steps are reduced to one
marker per bin. The response is bounded: at most `MAX_RUNS` runs, and at most
`MAX_VALUES` binned values over all runs (`points` is lowered to fit and the
response says so in `points_capped`).
"""

import numpy as np

from gradwatch import tags
from tensorboard_plugin_gradwatch import views

MAX_RUNS = 100
MAX_VALUES = 200_000  # binned values over all runs and lines: ~4 MB of JSON at most


def _run_entry(name, run_data, first, width):
    global_steps, _ = run_data.series[tags.GLOBAL]
    flagged = views.flagged_steps(run_data, tags.EXPLOSION)
    marked = np.asarray(flagged, np.int64)
    if marked.size:  # one marker per bin: the first exploding step in it
        bins = (marked - first) // width
        marked = marked[np.r_[True, bins[1:] != bins[:-1]]]
    last = int(global_steps[-1])
    return {
        "name": name,
        "first_step": int(global_steps[0]),
        "last_step": last,
        "stored_steps": int(global_steps.size),
        "sampled": int(global_steps.size) < last - int(global_steps[0]) + 1,
        "pre_clip": views._binned_line(run_data, tags.GLOBAL, first, width),
        "post_clip": views._binned_line(run_data, tags.GLOBAL_CLIPPED, first, width),
        "explosions": len(flagged),
        "explosion_steps": marked.tolist(),
    }


def compare_view(named_runs, points):
    """The `/compare` document for `[(run name, RunData or None)]`, at most `points` bins per line.

    Runs without gradwatch data (None, or no stored global norm) are listed in
    `missing`, in request order; the others in `runs`, in request order.
    """
    def has_norms(data):
        return data is not None and tags.GLOBAL in data.series and data.series[tags.GLOBAL][0].size > 0

    present = [(name, data) for name, data in named_runs if has_norms(data)]
    missing = [name for name, data in named_runs if not has_norms(data)]
    if not present:
        return {"empty": True, "runs": [], "missing": missing}
    lines = 2 * len(present)  # pre- and post-clip
    capped = min(points, max(10, MAX_VALUES // lines))
    globals_ = [data.series[tags.GLOBAL][0] for _, data in present]
    first = min(int(steps[0]) for steps in globals_)
    last = max(int(steps[-1]) for steps in globals_)
    stored = max(steps.size for steps in globals_)
    width, _ = views.step_grid(first, last, capped, stored)
    return {
        "empty": False,
        "first_step": first,
        "last_step": last,
        "bin_width": width,
        "points": capped,
        "points_capped": capped < points,
        "sampled": any(int(steps.size) < int(steps[-1]) - int(steps[0]) + 1 for steps in globals_),
        "runs": [_run_entry(name, data, first, width) for name, data in present],
        "missing": missing,
    }

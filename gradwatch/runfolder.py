"""Choosing the run folder a monitor writes to, so that a restart never hides earlier steps.

A fresh optimizer counts steps from 1 again: a second model trained with the
same monitor, or a model recompiled with a new optimizer. Written into a run
that already holds later steps, its steps would silently replace the earlier
ones in TensorBoard and in `gradwatch report` (the value written last wins).
So when a `fit()` starts at step 1 and the run folder already holds gradwatch
steps, the monitor writes to the next free sibling, `train_1`, `train_2`, ...
(as Keras' own log folders grow), and logs one warning naming both folders.

A `fit()` that resumes at a later step (from a checkpoint) keeps writing to
the same run: its steps follow on, or replace those written after the
checkpoint, as in TensorBoard. Reading the steps already written costs one
pass over gradwatch's own event files in the folder (about a second for
100k steps x 200 layers), once per `fit()`.
"""

import os

from gradwatch.eventfile import EVENT_FILE_PREFIX, _fields, _varint_at, iter_records

_GRADWATCH_FILE = ".gradwatch."  # in the names of the event files gradwatch writes


def _event_step(payload):
    for number, wire, lo, _ in _fields(payload, 0, len(payload)):
        if number == 2 and wire == 0:
            return _varint_at(payload, lo)[0]
    return 0


def last_step_written(run_dir):
    """The largest step in gradwatch's event files in `run_dir`, or 0 if none (or unreadable)."""
    try:
        names = [name for name in os.listdir(run_dir)
                 if name.startswith(EVENT_FILE_PREFIX) and _GRADWATCH_FILE in name]
    except OSError:
        return 0
    last = 0
    for name in names:
        try:
            for _, payload in iter_records(os.path.join(run_dir, name), on_damaged_tail=lambda offset, reason: None):
                last = max(last, _event_step(payload))
        except Exception:  # a damaged file is the readers' business, not a reason to stop training
            continue
    return last


def run_dir_for(run_dir, first_step):
    """`(run folder to write, warning or None)` for a `fit()` whose first step is `first_step`."""
    if first_step != 1 or "://" in run_dir:
        return run_dir, None
    held = last_step_written(run_dir)
    if not held:
        return run_dir, None
    number = 1
    while last_step_written(f"{run_dir}_{number}"):
        number += 1
    chosen = f"{run_dir}_{number}"
    return chosen, (f"gradwatch: this fit() starts again at step 1 (a new model or optimizer), but "
                    f"{run_dir!r} already holds steps up to {held}: writing to {chosen!r} so that "
                    "the earlier steps stay visible.")

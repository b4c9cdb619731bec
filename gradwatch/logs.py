"""Reading gradwatch data back from TensorBoard event files.

Shared by `gradwatch report` (and usable by the TensorBoard plugin). Files are
read whole and exactly -- every record, no reservoir sampling -- with the small
pure-Python reader of `gradwatch.eventfile`, so importing this module or reading
logs never imports TensorFlow. A garbled file raises `LogReadError`; a payload that no longer parses as an `Event` is reported as
corrupt.

A *run* is a folder under LOGDIR (LOGDIR itself included, named ".") that
directly holds `events.out.tfevents.*` files with gradwatch data: a
`grad_norm/global` value or any `gradwatch/*` tag. Run names are the folder
paths relative to LOGDIR with "/" separators. Symbolic links are followed only
while they stay inside LOGDIR; each real folder is read once.

Several event files in one run are read in file-name (creation) order. When a
step appears more than once (a run resumed from a checkpoint), the value written
last wins, for scalar series and for explosion and clipping records alike.
Explosion and clipping records are read as `gradwatch.rundata` describes; a
record that is not of that shape raises `LogReadError`.

A damaged last record of a file -- cut short (a live or interrupted write), a
bad length or data checksum, zeros appended after a power loss -- is skipped:
the file is read up to the damage, as TensorBoard reads it, with one note
naming the file and the byte in `RunData.notes`, as are JSON records too large or too deep
(refused before parsing); damage before the end of a file is a `LogReadError`
naming the file and byte offset.

Scalars are kept as numpy arrays (layer norms as float32, as written; tags
written together share one steps array): a 100k-step x 200-layer run takes
about 100 MB and reads in seconds.
"""

import os

import numpy as np

from gradwatch import tags
from gradwatch.eventfile import (  # noqa: F401 -- re-exported
    EVENT_FILE_PREFIX, LogReadError, iter_records, masked_crc32c)
from gradwatch.rundata import (  # noqa: F401 -- re-exported
    ClippingEvent, Explosion, RunData, Series, VanishingRecord, clipping_event_from_doc,
    explosion_from_doc, to_float, vanishing_from_doc)
from gradwatch.runreader import RunReader

__all__ = [
    "ClippingEvent", "Explosion", "LogReadError", "RunData", "Series", "VanishingRecord",
    "find_event_folders", "read_logdir", "read_run",
]


def _is_inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _event_files(dirpath, filenames, root):
    """Event files directly in `dirpath` whose real location is inside `root`."""
    found = []
    for name in sorted(filenames):
        full = os.path.join(dirpath, name)
        if name.startswith(EVENT_FILE_PREFIX) and _is_inside(os.path.realpath(full), root):
            if os.path.isfile(full):
                found.append(full)
    return found


def find_event_folders(logdir):
    """Yields `(run name, [event file paths])` for folders under `logdir`."""
    root = os.path.realpath(logdir)
    visited = set()
    for dirpath, dirnames, filenames in os.walk(logdir, followlinks=True):
        real = os.path.realpath(dirpath)
        if not _is_inside(real, root) or real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        # Real folders before symbolic links to them, so runs keep their real names.
        dirnames.sort(key=lambda name: (os.path.islink(os.path.join(dirpath, name)), name))
        files = _event_files(dirpath, filenames, root)
        if files:
            name = os.path.relpath(dirpath, logdir).replace(os.sep, "/")
            yield name, files


def _series(parts, dtype, shared_steps):
    """A `Series` of `parts` sorted by step; of equal steps the last written wins.

    Tags written together share one steps array, through `shared_steps`.
    """
    if not parts:
        return Series(np.zeros(0, np.int64), np.zeros(0, dtype))
    key = tuple(id(steps) for steps, _ in parts)
    if key not in shared_steps:
        shared_steps[key] = np.concatenate([steps for steps, _ in parts])
    steps = shared_steps[key]
    values = np.concatenate([values for _, values in parts])
    values = values.astype(dtype, copy=False)
    if len(steps) > 1 and not np.all(steps[1:] > steps[:-1]):
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        keep_last = np.append(steps[1:] != steps[:-1], True)
        steps, values = steps[keep_last], values[keep_last]
    return Series(steps=steps, values=values)


def _last_per_step(records, key=None):
    """Records sorted by step; of records sharing a step (a `key`), the last written."""
    by_step = {}
    for record in records:
        by_step[key(record) if key else record.step] = record
    return tuple(by_step[step] for step in sorted(by_step))


def _records(path, tag, docs, make, key=None):
    try:
        return _last_per_step((make(step, doc) for step, batch in docs for doc in batch), key)
    except (AttributeError, KeyError, OverflowError, TypeError, ValueError) as error:
        raise LogReadError(path, f"unexpected record format in tag {tag!r} ({error!r})")


def _layer_order(written, seen):
    """Layer paths: the last `gradwatch/layers` order first, then as first seen (linear time)."""
    seen = [layer for layer in seen if layer is not None]
    lists = [doc for _, doc in written if isinstance(doc, list)]  # anything else is ignored
    listed = list(dict.fromkeys(str(layer) for layer in lists[-1])) if lists else []
    seen_set, listed_set = set(seen), set(listed)
    return [layer for layer in listed if layer in seen_set] + [
        layer for layer in seen if layer not in listed_set]


def read_run(name, event_files):
    """`RunData` of one run folder's event files, or None without gradwatch data."""
    reader = RunReader()
    for path in event_files:
        try:
            reader.read_file(path)
        except OSError as error:
            raise LogReadError(path, error.strerror or str(error))
    if not reader.has_gradwatch_data:
        return None
    parts, docs = reader.parts, reader.json_docs
    where = os.path.dirname(event_files[0])
    layers = _layer_order(docs[tags.LAYERS], [tags.layer_of_tag(tag) for tag in parts])
    shared = {}
    return RunData(
        name=name,
        path=where,
        global_norm=_series(parts.pop(tags.GLOBAL, []), np.float64, shared),
        # Layer norms are float32 in the files: keep them compact.
        layer_norms={layer: _series(parts.pop(tags.layer_tag(layer)), np.float32, shared)
                     for layer in layers},
        explosions=_records(where, tags.EXPLOSIONS, docs[tags.EXPLOSIONS], explosion_from_doc),
        clipping=_records(where, tags.CLIPPING, docs[tags.CLIPPING], clipping_event_from_doc),
        vanishing=_records(where, tags.VANISHING, docs[tags.VANISHING], vanishing_from_doc,
                           key=lambda record: (record.step, record.kind)),
        other_series={tag: _series(tag_parts, np.float64, shared) for tag, tag_parts in parts.items()},
        notes=reader.notes,
    )


def read_logdir(logdir):
    """`RunData` of every run with gradwatch data under `logdir`, by run name.

    Raises `FileNotFoundError` / `NotADirectoryError` for a bad `logdir` and
    `LogReadError` for an unreadable event file.
    """
    if not os.path.exists(logdir):
        raise FileNotFoundError(logdir)
    if not os.path.isdir(logdir):
        raise NotADirectoryError(logdir)
    runs = (read_run(name, files) for name, files in find_event_folders(logdir))
    return [run for run in runs if run is not None]

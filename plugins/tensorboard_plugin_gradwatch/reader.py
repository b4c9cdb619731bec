"""Reading one run's gradwatch data through TensorBoard's data provider.

Works the same with the Python loader and with RustBoard (`--load_fast`): it
uses only `list_scalars`/`read_scalars` (plugin "scalars") and
`list_tensors`/`read_tensors` (plugin "gradwatch"). Results are cached per run
and re-read only when the run's data changed.
"""

import collections
import json
import threading

import numpy as np
from tensorboard.data import provider

from gradwatch import tags
from tensorboard_plugin_gradwatch import metadata

# "Downsample to at most this many points": larger than any run, so every
# sample TensorBoard kept is returned.
_ALL_POINTS = 10**9
_CACHED_RUNS = 4
_CACHED_GLOBALS = 256  # a run's global series only: small, and a sweep has many runs
# The series the run comparison reads: global norms and explosion flags only.
COMPARE_TAGS = (tags.GLOBAL, tags.GLOBAL_CLIPPED, tags.EXPLOSION)

RunData = collections.namedtuple(
    "RunData",
    [
        "layers",      # list of layer paths, model order
        "series",      # dict tag -> (steps int64 array, values float32 array)
        "explosions",  # list of explosion records (dicts), by step
        "clipping",    # list of clipping records (dicts), by step
    ],
)


def _run_filter(run, tag_list=None):
    return provider.RunTagFilter(runs=[run], tags=tag_list)


def _is_gradwatch_scalar(tag):
    return tag.startswith(tags.PREFIX)


class RunReader:
    """Lists runs holding gradwatch data and loads them as `RunData`."""

    def __init__(self, data_provider):
        self._provider = data_provider
        self._cache = collections.OrderedDict()  # run -> (fingerprint, RunData)
        self._globals = collections.OrderedDict()  # run -> (fingerprint, RunData), global tags only
        self._lock = threading.Lock()

    def _list(self, ctx, experiment_id, run=None):
        """(scalar listing, tensor listing), each run -> tag -> time series."""
        run_filter = _run_filter(run) if run is not None else None
        scalars = self._provider.list_scalars(
            ctx, experiment_id=experiment_id,
            plugin_name=metadata.SCALARS_PLUGIN_NAME, run_tag_filter=run_filter)
        tensors = self._provider.list_tensors(
            ctx, experiment_id=experiment_id,
            plugin_name=metadata.PLUGIN_NAME, run_tag_filter=run_filter)
        return scalars, tensors

    def runs(self, ctx, experiment_id):
        """Sorted list of `{"name", "last_step", "layers"}` for runs with gradwatch data."""
        scalars, tensors = self._list(ctx, experiment_id)
        found = {}
        for run, by_tag in tensors.items():
            if by_tag:
                found[run] = [ts.max_step for ts in by_tag.values()]
        for run, by_tag in scalars.items():
            if tags.GLOBAL in by_tag:
                found.setdefault(run, []).append(by_tag[tags.GLOBAL].max_step)
        result = []
        for run in sorted(found):
            run_scalars = scalars.get(run, {})
            layer_count = sum(1 for tag in run_scalars if tags.layer_of_tag(tag))
            result.append({"name": run, "last_step": max(found[run]), "layers": layer_count})
        return result

    def has_data(self, ctx, experiment_id):
        """Whether any run holds gradwatch data."""
        return bool(self.runs(ctx, experiment_id))

    def load(self, ctx, experiment_id, run):
        """`RunData` of `run`, or None if the run has no gradwatch data."""
        scalars, tensors = self._list(ctx, experiment_id, run)
        scalar_series = {
            tag: ts for tag, ts in scalars.get(run, {}).items() if _is_gradwatch_scalar(tag)
        }
        tensor_series = tensors.get(run, {})
        if not tensor_series and tags.GLOBAL not in scalar_series:
            return None
        fingerprint = tuple(sorted(
            (tag, ts.max_step, ts.max_wall_time)
            for tag, ts in list(scalar_series.items()) + list(tensor_series.items())
        ))
        with self._lock:
            cached = self._cache.get(run)
            if cached is not None and cached[0] == fingerprint:
                self._cache.move_to_end(run)
                return cached[1]
        data = self._read(ctx, experiment_id, run, list(scalar_series), list(tensor_series))
        with self._lock:
            self._cache[run] = (fingerprint, data)
            self._cache.move_to_end(run)
            while len(self._cache) > _CACHED_RUNS:
                self._cache.popitem(last=False)
        return data

    def load_globals(self, ctx, experiment_id, runs):
        """[(run, RunData of its `COMPARE_TAGS` series, or None)] for each of `runs`.

        One listing for all runs, then one read per run whose data changed (so
        a read stays small whatever the number of runs).
        """
        listing = self._provider.list_scalars(
            ctx, experiment_id=experiment_id, plugin_name=metadata.SCALARS_PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(runs=list(runs), tags=list(COMPARE_TAGS)))
        found = []
        for run in runs:
            by_tag = listing.get(run, {})
            if tags.GLOBAL not in by_tag:
                found.append((run, None))
                continue
            fingerprint = tuple(sorted((tag, ts.max_step, ts.max_wall_time) for tag, ts in by_tag.items()))
            with self._lock:
                cached = self._globals.get(run)
            if cached is None or cached[0] != fingerprint:
                read = self._provider.read_scalars(
                    ctx, experiment_id=experiment_id, plugin_name=metadata.SCALARS_PLUGIN_NAME,
                    downsample=_ALL_POINTS, run_tag_filter=_run_filter(run, list(by_tag)))
                series = {tag: _series_arrays(data) for tag, data in read.get(run, {}).items()}
                cached = (fingerprint, RunData(layers=[], series=series, explosions=[], clipping=[]))
                with self._lock:
                    self._globals[run] = cached
                    while len(self._globals) > _CACHED_GLOBALS:
                        self._globals.popitem(last=False)
            with self._lock:
                if run in self._globals:
                    self._globals.move_to_end(run)
            found.append((run, cached[1]))
        return found

    def _read(self, ctx, experiment_id, run, scalar_tags, tensor_tags):
        series = {}
        if scalar_tags:
            read = self._provider.read_scalars(
                ctx, experiment_id=experiment_id,
                plugin_name=metadata.SCALARS_PLUGIN_NAME,
                downsample=_ALL_POINTS, run_tag_filter=_run_filter(run, scalar_tags))
            for tag, data in read.get(run, {}).items():
                series[tag] = _series_arrays(data)
        documents = {}
        if tensor_tags:
            read = self._provider.read_tensors(
                ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME,
                downsample=_ALL_POINTS, run_tag_filter=_run_filter(run, tensor_tags))
            for tag, data in read.get(run, {}).items():
                documents[tag] = [_json_of(datum) for datum in data]
        layers = _layer_order(documents.get(tags.LAYERS, []), series)
        return RunData(
            layers=layers,
            series=series,
            explosions=_merged_records(documents.get(tags.EXPLOSIONS, [])),
            clipping=_merged_records(documents.get(tags.CLIPPING, [])),
        )


def _series_arrays(data):
    """(steps, values) arrays of a list of `ScalarDatum`, sorted by step."""
    steps = np.fromiter((d.step for d in data), dtype=np.int64, count=len(data))
    values = np.fromiter((d.value for d in data), dtype=np.float32, count=len(data))
    if steps.size > 1 and np.any(np.diff(steps) < 0):
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
    return steps, values


def _json_of(datum):
    """The JSON document held by a string-tensor datum, or None if unreadable."""
    try:
        raw = datum.numpy.item()
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):  # deep nesting too
        return None


def _layer_order(layer_documents, series):
    """Layer paths in model order: the last `gradwatch/layers` list, then any extra layers."""
    declared = []
    for document in layer_documents:
        if isinstance(document, list):
            declared = [str(path) for path in document]
    seen = set(declared)
    extra = sorted(
        path for path in (tags.layer_of_tag(tag) for tag in series)
        if path is not None and path not in seen
    )
    return declared + extra


def _merged_records(documents):
    """All records of a list of JSON lists, one per step (the latest wins), by step."""
    by_step = {}
    for document in documents:
        if not isinstance(document, list):
            continue
        for record in document:
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]

"""Reading one run's gradwatch data through TensorBoard's data provider.

Works the same with the Python loader and with RustBoard (`--load_fast`): it
uses only `list_scalars`/`read_scalars` (plugin "scalars") and
`list_tensors`/`read_tensors` (plugin "gradwatch"). Results are cached per run
and re-read only when the run's data changed.
"""

import collections
import logging
import threading

import numpy as np
from tensorboard.data import provider

from gradwatch import tags
from gradwatch.rundata import RefusedRecord, parse_json_record
from tensorboard_plugin_gradwatch import blocks, metadata, records

logger = logging.getLogger("gradwatch")

# "Downsample to at most this many points": larger than any run, so every
# sample TensorBoard kept is returned.
_ALL_POINTS = 10**9
_CACHED_RUNS = 4
_POINTS_PER_READ = 2_000_000  # scalar points per read: ~60 MB through the fast loader's gRPC
_JSON_TAGS = (tags.LAYERS, tags.EXPLOSIONS, tags.CLIPPING)
_CACHED_GLOBALS = 256  # a run's global series only: small, and a sweep has many runs
_COMPARE_BLOCK_CELLS = 20_000_000  # compare: read a run's blocks (every step) up to this many cells
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
        self._warned = set()

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
        data = self._read(ctx, experiment_id, run, scalar_series, list(tensor_series))
        with self._lock:
            self._cache[run] = (fingerprint, data)
            self._cache.move_to_end(run)
            while len(self._cache) > _CACHED_RUNS:
                self._cache.popitem(last=False)
        return data

    def load_globals(self, ctx, experiment_id, runs):
        """[(run, RunData of its `COMPARE_TAGS` series, or None)] for each of `runs`.

        One listing for all runs, then one read per run whose data changed. A run
        with `gradwatch/norms` blocks of at most `_COMPARE_BLOCK_CELLS` cells gives
        every step (its blocks are read through `load`); others their scalars
        (sampled by TensorBoard's default flags).
        """
        run_filter = provider.RunTagFilter(runs=list(runs))
        listing = self._provider.list_scalars(
            ctx, experiment_id=experiment_id, plugin_name=metadata.SCALARS_PLUGIN_NAME,
            run_tag_filter=run_filter)
        blocks_listing = self._provider.list_tensors(
            ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME,
            run_tag_filter=provider.RunTagFilter(runs=list(runs), tags=[tags.NORMS]))
        found = []
        for run in runs:
            all_tags = listing.get(run, {})
            by_tag = {tag: ts for tag, ts in all_tags.items() if tag in COMPARE_TAGS}
            norms = blocks_listing.get(run, {}).get(tags.NORMS)
            if tags.GLOBAL not in by_tag and norms is None:
                found.append((run, None))
                continue
            layer_count = sum(1 for tag in all_tags if tags.layer_of_tag(tag))
            use_blocks = norms is not None and (
                (int(norms.max_step) + 1) * (layer_count + 1) <= _COMPARE_BLOCK_CELLS)
            fingerprint = tuple(sorted((tag, ts.max_step, ts.max_wall_time) for tag, ts in by_tag.items()))
            if use_blocks:
                fingerprint += ((tags.NORMS, norms.max_step, norms.max_wall_time),)
            with self._lock:
                cached = self._globals.get(run)
            if cached is None or cached[0] != fingerprint:
                if use_blocks:
                    full = self.load(ctx, experiment_id, run)
                    series = {tag: full.series[tag] for tag in COMPARE_TAGS if full and tag in full.series}
                else:
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

    def _read(self, ctx, experiment_id, run, scalar_series, tensor_tags):
        documents = {}
        for tag in [tag for tag in tensor_tags if tag in _JSON_TAGS]:  # one bad tag loses only itself
            documents[tag] = [self._json_of(run, tag, datum)
                              for datum in self._read_tensor_tag(ctx, experiment_id, run, tag)]
        declared = _declared_layers(documents.get(tags.LAYERS, []))
        series = {}
        if tags.NORMS in tensor_tags and declared:
            series = blocks.series_of_blocks(
                self._read_tensor_tag(ctx, experiment_id, run, tags.NORMS), declared)
        # Scalars for what the blocks do not hold, tag by tag in bounded reads (the
        # fast loader's data server refuses answers over 256 MiB).
        wanted = {tag: ts for tag, ts in scalar_series.items() if tag not in series}
        for group in _bounded_groups(wanted):
            read = self._provider.read_scalars(
                ctx, experiment_id=experiment_id,
                plugin_name=metadata.SCALARS_PLUGIN_NAME,
                downsample=_ALL_POINTS, run_tag_filter=_run_filter(run, group))
            for tag, data in read.get(run, {}).items():
                series[tag] = _series_arrays(data)
        layers = _layer_order(declared, series)
        return RunData(
            layers=layers,
            series=series,
            explosions=_merged_records(documents.get(tags.EXPLOSIONS, []), records.explosion),
            clipping=_merged_records(documents.get(tags.CLIPPING, []), records.clipping),
        )

    def _read_tensor_tag(self, ctx, experiment_id, run, tag):
        """The `TensorDatum`s of one gradwatch tag; [] (and one warning) if the loader cannot
        convert them (TensorBoard's own conversion fails on some hand-made tensors)."""
        try:
            read = self._provider.read_tensors(
                ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME,
                downsample=_ALL_POINTS, run_tag_filter=_run_filter(run, [tag]))
        except Exception as error:
            self._warn_once((run, tag, "tensors"), "gradwatch: the records of tag %r in run %r "
                            "could not be read and are skipped (%s: %s)", tag, run,
                            type(error).__name__, error)
            return []
        return read.get(run, {}).get(tag, [])

    def _json_of(self, run, tag, datum):
        """The JSON document of a string-tensor datum, or None (refused or unreadable: one warning)."""
        try:
            raw = datum.numpy.item() if datum.numpy.size == 1 else None
            if not isinstance(raw, (bytes, str)):
                raise ValueError("not one string")
            return parse_json_record(raw)
        except RefusedRecord as refused:
            self._warn_once((run, tag, "refused"), "gradwatch: a JSON record of tag %r in run %r "
                            "was refused (%s)", tag, run, refused)
        except Exception as error:  # anything a hand-made file holds
            self._warn_once((run, tag, "unreadable"), "gradwatch: an unreadable record of tag %r in "
                            "run %r was skipped (%s)", tag, run, error)
        return None

    def _warn_once(self, key, message, *args):
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message, *args)


def _bounded_groups(series_by_tag):
    """Tags in groups whose points (bounded by each tag's step span) fit one read."""
    group, points = [], 0
    for tag in sorted(series_by_tag):
        count = max(1, int(series_by_tag[tag].max_step) + 1)
        if group and points + count > _POINTS_PER_READ:
            yield group
            group, points = [], 0
        group.append(tag)
        points += count
    if group:
        yield group


def _series_arrays(data):
    """(steps, values) arrays of a list of `ScalarDatum`, sorted by step."""
    steps = np.fromiter((d.step for d in data), dtype=np.int64, count=len(data))
    values = np.fromiter((d.value for d in data), dtype=np.float32, count=len(data))
    if steps.size > 1 and np.any(np.diff(steps) < 0):
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
    return steps, values


def _declared_layers(layer_documents):
    """The last `gradwatch/layers` list (unique names), or []."""
    declared = []
    for document in layer_documents:
        if isinstance(document, list):
            declared = list(dict.fromkeys(str(path) for path in document))
    return declared


def _layer_order(declared, series):
    """Layer paths in model order: the declared ones, then any extra layers (linear time)."""
    seen = set(declared)
    extra = sorted(
        path for path in (tags.layer_of_tag(tag) for tag in series)
        if path is not None and path not in seen
    )
    return declared + extra


def _merged_records(documents, clean):
    """All records of a list of JSON lists, cleaned by `clean`, one per step (the latest wins), by step."""
    by_step = {}
    for document in documents:
        if not isinstance(document, list):
            continue
        for record in document:
            record = clean(record)
            if record is not None:
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]

"""The `/vanishing?run=R` route: vanishing / dead-gradient records of a run.

Reads only the `gradwatch/vanishing` string tensors (JSON lists written by the
monitor, see `gradwatch.tags`) through TensorBoard's data provider; a document
or record that is not of the expected shape is skipped. Answers

    {"records": [{"step", "epoch", "kind", "layers": [[path, norm], ...]}, ...],   # by step
     "marks": [{"layer", "kind", "step"}, ...]}   # first onset per layer and kind

Missing `run` parameter: 400; a run without gradwatch vanishing data answers
empty lists (the dashboard's other routes say whether the run exists).
"""

import logging

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from werkzeug import wrappers

from gradwatch import tags
from gradwatch.rundata import parse_json_record
from tensorboard_plugin_gradwatch import metadata
from tensorboard_plugin_gradwatch import records as records_lib

logger = logging.getLogger("gradwatch")

KINDS = ("vanishing", "dead")
_ALL_POINTS = 10**9


def _records(documents):
    """Well-formed records of a list of JSON lists, one per (step, kind) (the latest wins), by step."""
    by_key = {}
    for document in documents:
        if not isinstance(document, list):
            continue
        for record in document:
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                    and record.get("kind") in KINDS and isinstance(record.get("layers"), list)):
                continue
            layers = [[records_lib.short_name(str(pair[0])), records_lib._number(pair[1])]
                      for pair in record["layers"][:records_lib.MAX_LAYER_PAIRS]
                      if isinstance(pair, list) and len(pair) == 2]
            by_key[(record["step"], record["kind"])] = {
                "step": record["step"], "epoch": records_lib._int(record.get("epoch")), "kind": record["kind"], "layers": layers}
    return [by_key[key] for key in sorted(by_key)]


def vanishing_view(documents):
    """The route's answer from the run's decoded JSON documents (pure)."""
    records = _records(documents)
    marks, seen = [], set()
    for record in records:
        for layer, _ in record["layers"]:
            if (layer, record["kind"]) not in seen:
                seen.add((layer, record["kind"]))
                marks.append({"layer": layer, "kind": record["kind"], "step": record["step"]})
    return {"records": records, "marks": marks}


def _json_of(datum):
    """The JSON document of a string-tensor datum, or None (refused as too large or deep, or unreadable)."""
    try:
        raw = datum.numpy.item() if datum.numpy.size == 1 else None
        return parse_json_record(raw)
    except Exception:  # anything a hand-made file holds
        return None


def read_documents(data_provider, ctx, experiment_id, run):
    """The decoded `gradwatch/vanishing` documents of `run`, in step order ([] if unreadable)."""
    run_filter = provider.RunTagFilter(runs=[run], tags=[tags.VANISHING])
    try:
        read = data_provider.read_tensors(ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME,
                                          downsample=_ALL_POINTS, run_tag_filter=run_filter)
    except Exception:  # TensorBoard's own conversion fails on some hand-made tensors
        logger.warning("gradwatch: the vanishing records of run %r could not be read", run, exc_info=True)
        return []
    data = read.get(run, {}).get(tags.VANISHING, [])
    return [_json_of(datum) for datum in data]


def app(data_provider):
    """The WSGI app of the route."""
    @wrappers.Request.application
    def serve(request):
        run = request.args.get("run")
        if not run:
            return http_util.Respond(request, {"error": "missing query parameter: run"},
                                     "application/json", code=400)
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        try:
            view = vanishing_view(read_documents(data_provider, ctx, eid, run))
        except Exception as error:  # never a 500 (see plugin.py)
            logger.warning("gradwatch: could not serve /vanishing for run %r", run, exc_info=True)
            return http_util.Respond(request, {"error": "could not read the vanishing records of run %r (%s)"
                                               % (run, type(error).__name__)}, "application/json", code=422)
        return http_util.Respond(request, view, "application/json")
    return serve

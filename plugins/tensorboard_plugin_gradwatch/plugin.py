"""The gradwatch TensorBoard plugin: HTTP routes and the loader.

Routes (under `/data/plugin/gradwatch/`):
  /index.js and the other files of `static/`   the dashboard (ES modules, CSS)
  /runs                                        runs holding gradwatch data
  /heatmap?run=R&columns=N                     layers x steps, max norm per bin
  /global?run=R&points=N                       global norm chart data
  /alerts?run=R&limit=N                        explosion records and clipping events
  /ranking?run=R&limit=N                       layers ranked by alerts led
  /compare?run=R1&run=R2...&points=N          global norms of several runs, one step grid
  /vanishing?run=R                             vanishing / dead-gradient records (`vanishing_view`)
Unknown run: 404 (for /compare: listed in "missing"). Missing or malformed
parameter: 400 with a message. Data no check foresaw: 422 with a message
(logged), never a 500. Responses are bounded: see `views.MAX_ROWS`,
`views.MAX_CELLS`, `compare.MAX_VALUES`, `records`.
"""

import logging
import mimetypes
import os

from tensorboard import context as tb_context
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from tensorboard_plugin_gradwatch import compare, metadata, reader, vanishing_view, views

logger = logging.getLogger("gradwatch")
_STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_JSON = "application/json"
# name -> (default, smallest, largest) of the integer query parameters.
_INT_PARAMS = {
    "columns": (400, 1, 4000),
    "points": (1000, 10, 10000),
    "limit": (1000, 1, 10000),
}


class BadRequest(ValueError):
    """A malformed query parameter; its message is sent with a 400."""


def int_param(request, name):
    """The integer query parameter `name`, its default if absent; BadRequest if invalid."""
    default, lowest, highest = _INT_PARAMS[name]
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("%s must be an integer, got %r" % (name, raw))
    if not lowest <= value <= highest:
        raise BadRequest("%s must be between %d and %d, got %d" % (name, lowest, highest, value))
    return value


def _static_files():
    """Route -> (file path, mimetype) of every file in `static/`."""
    routes = {}
    for name in sorted(os.listdir(_STATIC_DIR)):
        mimetype = "text/javascript" if name.endswith(".js") else mimetypes.guess_type(name)[0]
        routes["/" + name] = (os.path.join(_STATIC_DIR, name), mimetype or "text/plain")
    return routes


class GradwatchPlugin(base_plugin.TBPlugin):
    """Gradient-norm heat map, global norm chart, alerts and clipping view."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context):
        self._reader = reader.RunReader(context.data_provider)
        self._vanishing_app = vanishing_view.app(context.data_provider)

    def get_plugin_apps(self):
        apps = {route: self._static_app(path, mimetype)
                for route, (path, mimetype) in _static_files().items()}
        apps.update({
            "/runs": self._serve_runs,
            "/heatmap": self._run_route(lambda data, request: views.heatmap_view(
                data, int_param(request, "columns"))),
            "/global": self._run_route(lambda data, request: views.global_view(
                data, int_param(request, "points"))),
            "/alerts": self._run_route(lambda data, request: views.alerts_view(
                data, int_param(request, "limit"))),
            "/ranking": self._run_route(lambda data, request: views.ranking_view(
                data, int_param(request, "limit"))),
            "/compare": self._serve_compare,
        })
        apps["/vanishing"] = self._vanishing_app
        return apps

    def is_active(self):
        """Active iff some run holds gradwatch data."""
        return self._reader.has_data(tb_context.RequestContext(), experiment_id="")

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name=metadata.PLUGIN_NAME)

    @staticmethod
    def _static_app(path, mimetype):
        @wrappers.Request.application
        def serve(request):
            with open(path, "rb") as handle:
                return http_util.Respond(request, handle.read(), mimetype)
        return serve

    @wrappers.Request.application
    def _serve_runs(self, request):
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        return http_util.Respond(request, {"runs": self._reader.runs(ctx, eid)}, _JSON)

    @wrappers.Request.application
    def _serve_compare(self, request):
        runs = list(dict.fromkeys(request.args.getlist("run")))  # unique, in request order
        try:
            if not runs or not all(runs):
                raise BadRequest("give one or more runs: run=R1&run=R2...")
            if len(runs) > compare.MAX_RUNS:
                raise BadRequest("at most %d runs per request, got %d" % (compare.MAX_RUNS, len(runs)))
            points = int_param(request, "points")
        except BadRequest as error:
            return http_util.Respond(request, {"error": str(error)}, _JSON, code=400)
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        try:
            named = self._reader.load_globals(ctx, eid, runs)
            return http_util.Respond(request, compare.compare_view(named, points), _JSON)
        except Exception as error:  # see _run_route
            return _unreadable(request, runs[0] if len(runs) == 1 else "one of %d runs" % len(runs), error)

    def _run_route(self, build):
        """A WSGI app answering `build(run_data, request)` for the `run` parameter."""
        @wrappers.Request.application
        def serve(request):
            run = request.args.get("run")
            try:
                if not run:
                    raise BadRequest("missing query parameter: run")
                ctx = plugin_util.context(request.environ)
                eid = plugin_util.experiment_id(request.environ)
                data = self._reader.load(ctx, eid, run)
                if data is None:
                    return http_util.Respond(
                        request, {"error": "no gradwatch data in run %r" % run}, _JSON, code=404)
                return http_util.Respond(request, build(data, request), _JSON)
            except BadRequest as error:
                return http_util.Respond(request, {"error": str(error)}, _JSON, code=400)
            except Exception as error:  # a file no check foresaw: a 4xx with a message, never a 500
                return _unreadable(request, run, error)
        return serve


def _unreadable(request, run, error):
    """422 naming the run, for data no check foresaw; the traceback goes to the log."""
    logger.warning("gradwatch: could not serve %s for run %r", request.path, run, exc_info=True)
    message = "could not read the gradwatch data of run %r (%s)" % (run, type(error).__name__)
    return http_util.Respond(request, {"error": message}, _JSON, code=422)


class GradwatchPluginLoader(base_plugin.TBLoader):
    """Loads the plugin and makes TensorBoard keep every gradwatch sample.

    TensorBoard keeps 10 samples per tag of an unknown plugin by default; the
    explosion and clipping records are written once per flush, so all of them
    must be kept. The user's own `--samples_per_plugin=gradwatch=N` wins.
    """

    def fix_flags(self, flags):
        samples = getattr(flags, "samples_per_plugin", None)
        if samples is None:
            samples = {}
            flags.samples_per_plugin = samples
        samples.setdefault(metadata.PLUGIN_NAME, metadata.KEEP_ALL_SAMPLES)

    def load(self, context):
        return GradwatchPlugin(context)

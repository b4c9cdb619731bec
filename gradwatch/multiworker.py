"""Which worker writes: under a multi-worker strategy only the chief writes
summaries and logs alerts.

Every worker computes identical records (from the same all-reduced gradient),
so the other workers write theirs to a scratch folder outside the logs, which
they remove at the end of `fit()`, and their alerts (the "gradwatch" logger's
records carrying `gradwatch_explosion`, `gradwatch_burst` or
`gradwatch_clipping`) are dropped meanwhile; warnings about gradwatch itself
still show. The chief is the "chief" task if the cluster has one, else worker 0
(TensorFlow's convention). Without a cluster resolver every process is chief.
"""

import logging
import shutil
import tempfile

from gradwatch import alerts


def is_chief(strategy):
    """True unless `strategy` runs on several workers and this is not the chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or task_type is None:
        return True
    try:
        jobs = resolver.cluster_spec().as_dict()
    except Exception:  # no cluster: a single worker
        return True
    if "chief" in jobs:
        return task_type == "chief"
    return task_type == "worker" and int(resolver.task_id or 0) == 0


class WorkerRole:
    """The chief writes to `run_dir`; another worker to a scratch folder."""

    def __init__(self, strategy):
        self.chief = is_chief(strategy)
        self.task = None
        if not self.chief:
            resolver = strategy.cluster_resolver
            self.task = f"{resolver.task_type}_{resolver.task_id}"
        self.scratch = None
        self._filter = None

    def run_dir(self, run_dir):
        if self.chief:
            return run_dir
        self.scratch = tempfile.mkdtemp(prefix=f"gradwatch_{self.task}_")
        return self.scratch

    def begin(self):
        """Drops alert records on a non-chief worker."""
        if not self.chief and self._filter is None:
            self._filter = alerts.MuteAlerts()
            logging.getLogger("gradwatch").addFilter(self._filter)

    def end(self):
        """Unmutes, and removes the scratch folder (after the writer closed)."""
        if self._filter is not None:
            logging.getLogger("gradwatch").removeFilter(self._filter)
            self._filter = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


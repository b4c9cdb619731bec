"""Summaries of gradwatch runs for `gradwatch report`: a JSON document and a text table.

`summarize(logdir, runs)` builds the document described in `gradwatch.cli`
(schema version `REPORT_VERSION`); `format_text(document)` renders it for a
terminal. Both take `gradwatch.logs.RunData` and never import TensorFlow.
"""

import math
import os

import numpy as np

from gradwatch.summaries import json_safe
from gradwatch.tags import TRAIN_RUN

REPORT_VERSION = 1
TOP_LAYER_COUNT = 5
SHOWN_EXPLOSIONS = 10  # explosion rows shown per run in the text report


def _optional(value):
    return None if value is None else json_safe(value)


def _finite_stats(values):
    """`{"max", "median", "nonfinite"}` over the finite values of an array."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return {
        "max": float(finite.max()) if finite.size else None,
        "median": float(np.median(finite)) if finite.size else None,
        "nonfinite": int(values.size - finite.size),
    }


def _severity(norm):
    """Sort key: NaN/Inf are the worst, then larger norms."""
    return (1, 0.0) if not math.isfinite(norm) else (0, norm)


def _explosion_record(explosion):
    return {
        "step": explosion.step,
        "epoch": explosion.epoch,
        "global_norm": json_safe(explosion.global_norm),
        "threshold": _optional(explosion.threshold),
        "action": explosion.action,
        "nonfinite": explosion.nonfinite,
        "layers": [[name, json_safe(norm)] for name, norm in explosion.layers],
        "culprits": None if explosion.culprits is None else [
            {key: (value if key == "index" or value is None else json_safe(value)) for key, value in culprit.items()}
            for culprit in explosion.culprits],
        "culprits_summary": explosion.culprits_summary,
        "batch_size": explosion.batch_size,
        "culprits_arrays": explosion.culprits_arrays,
    }


def _explosions(run):
    records = run.explosions
    worst = max(records, key=lambda e: _severity(e.global_norm), default=None)
    return {
        "count": len(records),
        "first_step": records[0].step if records else None,
        "worst": None if worst is None else json_safe(worst.global_norm),
        "worst_step": None if worst is None else worst.step,
        "nonfinite": sum(1 for e in records if e.nonfinite),
        "records": [_explosion_record(e) for e in records],
    }


def _top_layers(run):
    """Layers ranked by explosions led, then NaN/Inf norms seen, then max norm."""
    led = {}
    for explosion in run.explosions:
        if explosion.leading_layer is not None:
            led[explosion.leading_layer] = led.get(explosion.leading_layer, 0) + 1
    names = list(run.layer_norms) + [name for name in led if name not in run.layer_norms]
    rows = []
    for name in names:
        series = run.layer_norms.get(name)
        stats = _finite_stats(series.values if series is not None else [])
        rows.append({"layer": name, "explosions_led": led.get(name, 0),
                     "max_norm": stats["max"], "median_norm": stats["median"],
                     "nonfinite": stats["nonfinite"]})
    rows.sort(key=lambda r: (-r["explosions_led"], -r["nonfinite"],
                             -(r["max_norm"] if r["max_norm"] is not None else -math.inf)))
    return rows[:TOP_LAYER_COUNT]


def _restart_text(event):
    if not event.get("restarted"):
        return ""
    step = event.get("restart_step")
    if isinstance(step, int) and step > 1:
        return f"; rolled back to the weights before step {step}"
    return "; restarted from the weights before the first step"


def _clipping(run):
    return [{"step": c.step, "mode": c.mode, "threshold": _optional(c.threshold),
             "cause_step": c.cause_step, "restarted": c.restarted, "restart_step": c.restart_step}
            for c in run.clipping]


def _vanishing(run):
    """Vanishing / dead-gradient onsets, and the layers flagged of each kind (first onset)."""
    records = [{"step": r.step, "epoch": r.epoch, "kind": r.kind,
                "layers": [[name, json_safe(norm)] for name, norm in r.layers]}
               for r in getattr(run, "vanishing", ())]
    first = {"vanishing": {}, "dead": {}}
    for record in records:
        for name, _ in record["layers"]:
            first.setdefault(record["kind"], {}).setdefault(name, record["step"])
    return {"count": len(records),
            "layers": {kind: [{"layer": name, "first_step": step} for name, step in found.items()]
                       for kind, found in first.items()},
            "records": records}


def summarize_run(run):
    """The report entry of one `RunData`."""
    return {
        "run": run.name,
        "steps": {"first": run.first_step, "last": run.last_step, "count": run.step_count},
        "global_norm": _finite_stats(run.global_norm.values),
        "explosions": _explosions(run),
        "top_layers": _top_layers(run),
        "clipping": _clipping(run),
        "vanishing": _vanishing(run),
        "notes": list(run.notes),
    }


def sweep_summary(logdir):
    """`(the "sweep" object of the report, or None; a problem to warn about, or None)`."""
    from gradwatch.sweep import results as sweep_results

    if not sweep_results.is_sweep_folder(logdir):
        return None, None
    try:
        document = sweep_results.read_results(logdir).to_json()
    except sweep_results.SweepReadError as error:
        return None, f"clipping sweep not read: {error}"
    for trial in document["trials"] + ([document["best"]] if document["best"] else []):
        trial["run"] = os.path.relpath(os.path.join(trial["log_dir"], TRAIN_RUN), logdir).replace(os.sep, "/")
    return document, None


def _sweep_text(sweep):
    lines = [f"clipping sweep: {sweep['objective']} ({'lower' if sweep['direction'] == 'min' else 'higher'}"
             f" is better), {len(sweep['trials'])} trials, best first"]
    rows = []
    for rank, t in enumerate(sweep["trials"], start=1):
        clipping = "no clipping" if t["mode"] is None else f"{t['mode']}={_num(t['threshold'])}"
        diverged = "yes" if t["diverged"] else ("no" if t["status"] == "COMPLETED" else str(t["status"]).lower())
        rows.append([rank, t["trial_id"], clipping, _num(t["value"]), diverged, t["explosions"], t["steps"],
                     t["run"]])
    lines += _table(["rank", "trial", "clipping", sweep["objective"], "diverged", "explosions", "steps", "run"],
                    rows, indent="  ")
    lines.append(f"  best: {sweep['recommendation']}")
    return lines


def summarize(logdir, runs):
    """The whole report document (see `gradwatch.cli` for the schema)."""
    return {
        "gradwatch_report_version": REPORT_VERSION,
        "logdir": logdir,
        "runs": [summarize_run(run) for run in runs],
    }


# -- text --------------------------------------------------------------------


def _num(value):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value  # "nan", "inf", "-inf"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _table(header, rows, indent=""):
    """Lines of an aligned table; numeric-looking columns right-aligned."""
    cells = [header] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = [all(_numeric(row[i]) for row in cells[1:]) for i in range(len(header))]
    lines = []
    for row in cells:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append((indent + "  ".join(padded)).rstrip())
    return lines


def _numeric(text):
    try:
        float(text)
        return True
    except ValueError:
        return text == "-"


def _epoch_text(epoch):
    """Epochs count from 1 in the text, like the log lines and Keras' progress bar."""
    return str(epoch + 1) if isinstance(epoch, int) else "-"


def _steps_text(steps):
    if not steps["count"]:
        return "-"
    return f"{steps['first']}..{steps['last']} ({steps['count']})"


def _overview(runs):
    header = ["run", "steps", "max norm", "median norm", "non-finite", "explosions",
              "first explosion", "worst"]
    rows = [[r["run"], _steps_text(r["steps"]), _num(r["global_norm"]["max"]),
             _num(r["global_norm"]["median"]), r["global_norm"]["nonfinite"],
             r["explosions"]["count"], _num(r["explosions"]["first_step"]),
             _num(r["explosions"]["worst"])] for r in runs]
    return _table(header, rows)


def _run_details(run):
    lines = [f"run {run['run']!r}:"]
    explosions = run["explosions"]
    if explosions["count"]:
        lines.append(f"  explosions: {explosions['count']} (first at step {explosions['first_step']}, "
                     f"worst {_num(explosions['worst'])} at step {explosions['worst_step']}, "
                     f"{explosions['nonfinite']} non-finite)")
        shown = explosions["records"][:SHOWN_EXPLOSIONS]
        rows = [[e["step"], _epoch_text(e["epoch"]), _num(e["global_norm"]), _num(e["threshold"]),
                 e["action"] or "-", e["layers"][0][0] if e["layers"] else "-"] for e in shown]
        lines += _table(["step", "epoch", "global norm", "threshold", "action", "top layer"],
                        rows, indent="    ")
        lines += _culprit_lines(shown)
        if explosions["count"] > len(shown):
            lines.append(f"    ... {explosions['count'] - len(shown)} more (see --json)")
    else:
        lines.append("  explosions: none")
    if run["top_layers"]:
        lines.append("  top layers:")
        rows = [[t["layer"], t["explosions_led"], _num(t["max_norm"]), _num(t["median_norm"]),
                 t["nonfinite"]] for t in run["top_layers"]]
        lines += _table(["layer", "explosions led", "max norm", "median norm", "non-finite"],
                        rows, indent="    ")
    for kind, found in run.get("vanishing", {}).get("layers", {}).items():
        if found:
            names = ", ".join(f"{f['layer']} (step {f['first_step']})" for f in found)
            lines.append(f"  {kind} gradients: {names}")
    for event in run["clipping"]:
        lines.append(f"  clipping: {event['mode']} switched on at step {event['step']}, "
                     f"threshold {_num(event['threshold'])}"
                     + _restart_text(event))
    for note in run.get("notes", ()):
        lines.append(f"  note: {note}")
    return lines


SHOWN_CULPRITS = 3


def _culprit_lines(explosions):
    """Per explosion with a kept batch: its summary and top-ranked samples."""
    lines = []
    for e in explosions:
        culprits = e.get("culprits")
        if not culprits:
            continue
        top = ", ".join(f"#{c['index']} (loss {_num(c['loss'])}, grad norm {_num(c['grad_norm'])}, "
                        f"share {_share(c['share'])})" for c in culprits[:SHOWN_CULPRITS])
        lines.append(f"    step {e['step']} culprits: {top}")
        if e.get("culprits_summary"):
            lines.append(f"      {e['culprits_summary']}")
    return lines


def _share(value):
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.0%}"
    return str(value)


def format_text(document):
    """The report as aligned plain text, one overview table then a block per run."""
    lines = [f"gradwatch report of {document['logdir']}", ""]
    if document.get("sweep"):
        lines += _sweep_text(document["sweep"]) + [""]
    lines += _overview(document["runs"])
    for run in document["runs"]:
        lines += [""] + _run_details(run)
    return "\n".join(lines) + "\n"

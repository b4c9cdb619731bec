"""The `gradwatch` command: `gradwatch demo` and `gradwatch report LOGDIR`.

Exit status: 0 success; 1 `--fail-on-explosion` and some run exploded, or
`--fail-on-vanishing` and some run had vanishing or dead gradients; 2 usage
errors, a missing LOGDIR, no gradwatch run under it, or an unreadable event
file (one line on stderr, `gradwatch: error: ...`, never a traceback).

`gradwatch report LOGDIR --json` prints one JSON document (strict JSON: NaN
and infinities are the strings "nan", "inf", "-inf"; absent values are null):

    {
      "gradwatch_report_version": 1,
      "logdir": "<LOGDIR as given>",
      "runs": [                              # sorted by run name
        {
          "run": "train",                    # folder relative to LOGDIR ("." for LOGDIR)
          "steps": {"first": 1, "last": 900, "count": 900},   # steps with a global norm
          "global_norm": {                   # over finite values; null if none
            "max": 12.5, "median": 0.93,
            "nonfinite": 2                   # steps whose global norm is NaN/Inf
          },
          "explosions": {
            "count": 3, "first_step": 120,   # first_step null without explosions
            "worst": "nan", "worst_step": 450,   # NaN/Inf count as worst, then largest
            "nonfinite": 1,                  # explosions with a NaN/Inf gradient
            "records": [                     # every explosion, by step
              {"step": 120, "epoch": 0, "global_norm": 5200.0, "threshold": 41.7,
               "action": "clipping_on",      # none | clipping_on | clipped | skipped
               "nonfinite": false,
               "layers": [["lstm", 5100.0], ["dense_2", 98.0]]}   # largest first
            ]
          },
          "top_layers": [                    # at most 5: by explosions led (top layer of
            {"layer": "lstm",                # the record), then NaN/Inf count, then max norm
             "explosions_led": 2, "max_norm": 5100.0, "median_norm": 0.4, "nonfinite": 0}
          ],
          "clipping": [                      # clipping switched on, by step
            {"step": 120, "mode": "clipnorm", "threshold": 1.0, "cause_step": 120,
             "restarted": false,             # the weights went back to those kept:
             "restart_step": null}           # before this step (1: the first), else null
          ],
          "vanishing": {                     # vanishing / dead-gradient onsets
            "count": 2,
            "layers": {                      # layers flagged, model order of first onset
              "vanishing": [{"layer": "dense", "first_step": 100}],
              "dead": [{"layer": "branch", "first_step": 250}]
            },
            "records": [                     # every onset, by step
              {"step": 100, "epoch": 0, "kind": "vanishing",   # vanishing | dead
               "layers": [["dense", 1.5e-09]]}                 # norm at that step
            ]
          },
          "notes": [                         # what was skipped while reading, one line each:
            "<file>: record cut short at byte 1234 ..."   # a truncated last record (live or
          ]                                  # interrupted write), JSON records refused as too
        }                                    # large or too deeply nested
      ]
    }

`"sweep"` is null unless LOGDIR is the `log_dir` of a `gradwatch.ClippingSweep`
(it holds `gradwatch_sweep.json`); then:

    "sweep": {
      "objective": "val_loss", "direction": "min",    # "max" for accuracies
      "trials": [                              # best first: completed, not diverged, by value
        {"trial_id": "05", "mode": "clipnorm",   # null for the trial without clipping
         "threshold": 0.3,                       # null without clipping
         "value": 0.015,                         # objective at the best epoch; a diverged
                                                 # trial has the worst value ("inf" / "-inf")
         "diverged": false, "explosions": 2, "steps": 900,
         "status": "COMPLETED",                  # KerasTuner's; "RUNNING" while training
         "log_dir": "<LOGDIR>/trial_05-clipnorm=0.3",
         "run": "trial_05-clipnorm=0.3/train"}   # the trial's gradwatch run in "runs"
      ],
      "best": {...},                           # a trial as above, or null if all diverged
      "recommendation": "clipnorm=0.3: val_loss 0.015, 33x better than no clipping (0.5)",
      "thresholds": {"clipnorm": [            # per mode, how each threshold was chosen
        {"value": 0.3, "rule": "p10", "clipped_fraction": 0.9}]}   # or "rule": "given"
    }

`epoch` counts from 0 in the JSON (like `Explosion.epoch` and callbacks' `epoch`
argument) and from 1 in the text report (like the log lines and Keras' progress
bar). Every string in both formats has its control, format (bidi) and
separator characters escaped (U+202E as `\\u202e` in both), so a
hostile run or layer name cannot move the terminal's cursor or reorder text.
Notes (truncated tails, refused records) are also printed to stderr.

New keys may be added within version 1; renaming or removing one bumps the version.
Importing this module or running `report` imports neither TensorFlow nor Keras,
so `report` works whatever Keras backend is set (`KERAS_BACKEND`); `demo` needs
Keras' TensorFlow backend (on another: a one-line error, exit status 2).
"""

import argparse
import json
import os
import re
import sys
import unicodedata

import gradwatch

EXIT_OK, EXIT_EXPLODED, EXIT_ERROR = 0, 1, 2
PROG = "gradwatch"


class _ReportError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def build_parser():
    """The argument parser of the `gradwatch` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Gradient monitoring for Keras: a demo, and reports of gradwatch log folders.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {gradwatch.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    report = commands.add_parser(
        "report", help="summarize the gradwatch runs under a log folder",
        description="For every run under LOGDIR with gradwatch data: steps covered, max and "
                    "median global norm, explosions, top layers and clipping events.")
    report.add_argument("logdir", metavar="LOGDIR",
                        help="folder searched recursively for runs (folders holding event files)")
    report.add_argument("--json", action="store_true",
                        help="print a JSON document (schema: `pydoc gradwatch.cli`)")
    report.add_argument("--fail-on-explosion", action="store_true",
                        help="exit with status 1 if any run had a gradient explosion (for CI)")
    report.add_argument("--fail-on-vanishing", action="store_true",
                        help="exit with status 1 if any run had vanishing or dead gradients (for CI)")
    report.set_defaults(handler=run_report)

    demo = commands.add_parser(
        "demo", help="train a recurrent net whose gradients explode, plainly then with gradwatch",
        description="Trains a SimpleRNN on the adding problem (synthetic data made in code) with "
                    "plain SGD, whose gradients explode, then the same with gradwatch's automatic "
                    "clipping; prints the alerts, a comparison and the tensorboard command.")
    demo.add_argument("--logdir", default=None,
                      help="log folder (default: ./gradwatch_logs/demo-<date>-<time>, new each run)")
    demo.add_argument("--epochs", type=_positive_int, default=None, help="epochs per run (default: 8)")
    demo.add_argument("--seed", type=int, default=1,
                      help="seed of the data, the weights and the batch order (default: 1; other seeds: "
                           "see examples/adding_problem.py)")
    demo.set_defaults(handler=run_demo)
    return parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text!r}")
    return value


def run_demo(args, out, err):
    """`gradwatch demo`: see `gradwatch.demo`."""
    from gradwatch import demo

    demo.import_tensorflow_quietly()  # first: the backend check imports Keras, hence TensorFlow
    from gradwatch import versions

    try:
        versions.check_backend()  # before any data or model: the whole message, no traceback
    except versions.UnsupportedBackendError as error:
        raise _ReportError(str(error))
    logdir = args.logdir or demo.default_logdir()
    return demo.run_demo(logdir, args.epochs, args.seed, out)


def _load_runs(logdir):
    from gradwatch import logs

    try:
        runs = logs.read_logdir(logdir)
    except FileNotFoundError:
        raise _ReportError(f"LOGDIR does not exist. Received: logdir={logdir!r}")
    except NotADirectoryError:
        raise _ReportError(f"LOGDIR must be a folder. Received: logdir={logdir!r}")
    except logs.LogReadError as error:
        raise _ReportError(str(error))
    if not runs:
        raise _ReportError(
            f"No gradwatch runs found under {logdir!r}: no folder holds event files "
            "with gradwatch data (written by `gradwatch.GradientMonitor`).")
    return sorted(runs, key=lambda run: run.name)


def _invisible(char):
    return unicodedata.category(char)[0] == "C" or unicodedata.category(char) in ("Zl", "Zp")


def _escape(text):
    """`text` with control, format (bidi), separator and other invisible
    characters as escapes (run and layer names come from folder names and
    event files: no terminal escapes, no reordered text)."""
    if not isinstance(text, str):
        return text
    return "".join(char if not _invisible(char)
                   else char.encode("unicode_escape").decode("ascii") for char in text)


_NON_ASCII = re.compile("[\x7f-\U0010ffff]")  # json.dumps already escapes controls below 0x20


def _json_escape_invisible(text):
    """JSON text with its invisible characters written as `\\uXXXX` escapes (same value)."""
    def escape(match):
        char = match.group()
        if not _invisible(char):
            return char
        units = (ord(char),) if ord(char) < 0x10000 else _surrogates(ord(char))
        return "".join("\\u%04x" % unit for unit in units)
    return _NON_ASCII.sub(escape, text)


def _surrogates(code):
    code -= 0x10000
    return (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))


def _printable(value):
    """A copy of a report document with every string escaped by `_escape`."""
    if isinstance(value, dict):
        return {key: _printable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(item) for item in value]
    return _escape(value)


def run_report(args, out, err):
    """`gradwatch report`: prints the report; returns the exit status."""
    from gradwatch import report

    document = report.summarize(args.logdir, _load_runs(args.logdir))
    document["sweep"], problem = report.sweep_summary(args.logdir)
    if problem:
        err.write(f"{PROG}: warning: {_escape(problem)}\n")
    for run in document["runs"]:
        for note in run["notes"]:
            err.write(f"{PROG}: note: run {_escape(run['run'])!r}: {_escape(note)}\n")
    if args.json:
        text = json.dumps(document, indent=2, allow_nan=False, ensure_ascii=False)
        out.write(_json_escape_invisible(text) + "\n")
    else:
        out.write(report.format_text(_printable(document)))
    exploded = [run for run in document["runs"] if run["explosions"]["count"]]
    if args.fail_on_explosion and exploded:
        for run in exploded:
            explosions = run["explosions"]
            err.write(f"{PROG}: run {_escape(run['run'])!r} exploded: {explosions['count']} "
                      f"explosion(s), first at step {explosions['first_step']}\n")
        return EXIT_EXPLODED
    vanished = [run for run in document["runs"] if run["vanishing"]["count"]]
    if getattr(args, "fail_on_vanishing", False) and vanished:
        for run in vanished:
            flagged = run["vanishing"]["layers"]
            err.write(f"{PROG}: run {_escape(run['run'])!r} had "
                      + "; ".join(f"{kind} gradients in {', '.join(_escape(f['layer']) for f in found)}"
                                  for kind, found in flagged.items() if found) + "\n")
        return EXIT_EXPLODED
    return EXIT_OK


def _silence_stdout():
    """Points stdout at /dev/null so exiting after a closed pipe stays quiet."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


def main(argv=None):
    """Entry point of the `gradwatch` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    try:
        return args.handler(args, sys.stdout, sys.stderr)
    except _ReportError as error:
        sys.stderr.write(f"{PROG}: error: {_escape(str(error))}\n")
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `gradwatch report LOGDIR | head`
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    except (Exception, RecursionError) as error:  # never a traceback, never exit 1 by accident
        message = f"{type(error).__name__}: {error}"[:500]
        sys.stderr.write(f"{PROG}: error: could not {args.command}: {_escape(message)}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

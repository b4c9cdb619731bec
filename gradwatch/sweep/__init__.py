"""The clipping sweep: `ClippingSweep`, on KerasTuner (`pip install "gradwatch[sweep]"`).

Importing this package imports neither TensorFlow nor KerasTuner; `gradwatch
report` reads sweep folders through `gradwatch.sweep.results`.
"""

from gradwatch.sweep.results import SweepResults, SweepTrial  # noqa: F401


def __getattr__(name):
    if name == "ClippingSweep":
        from gradwatch.sweep.sweep import ClippingSweep

        return ClippingSweep
    raise AttributeError(f"module 'gradwatch.sweep' has no attribute {name!r}")

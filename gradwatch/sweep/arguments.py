"""Argument checks of `ClippingSweep` (Keras style: `ValueError` naming the
argument and the value received), and KerasTuner's import with a clear error."""

import os

from gradwatch import clipping, validation

_EXTRA_HINT = 'ClippingSweep needs KerasTuner: install it with `pip install "gradwatch[sweep]"` (or `pip install keras-tuner`).'


def keras_tuner_module():
    try:
        import keras_tuner
    except ImportError as error:
        raise ImportError(f"{_EXTRA_HINT} ({error})") from error
    return keras_tuner


def check_objective(objective):
    keras_tuner = keras_tuner_module()
    from keras_tuner.src.engine import objective as objective_lib

    if isinstance(objective, str) or type(objective) is keras_tuner.Objective:
        try:
            return objective_lib.create_objective(objective)
        except ValueError as error:
            raise ValueError(f"`objective`: {error} Received: objective={objective!r}") from None
    raise ValueError("`objective` must be a metric name (e.g. 'val_loss') or one "
                     f"`keras_tuner.Objective`. Received: objective={objective!r}")


def check_modes(modes):
    if isinstance(modes, str):
        modes = (modes,)
    try:
        modes = tuple(modes)
    except TypeError:
        modes = None
    if (not modes or any(not isinstance(m, str) or m not in clipping.MODES for m in modes)
            or len(set(modes)) != len(modes)):
        raise ValueError(f"`modes` must be a non-empty sequence of distinct modes among "
                         f"{', '.join(map(repr, clipping.MODES))}. Received: modes={modes!r}")
    return modes


def _check_threshold_list(name, values):
    if isinstance(values, str) or not hasattr(values, "__iter__"):
        raise ValueError(f"`{name}` must be a non-empty list of positive numbers. Received: {name}={values!r}")
    values = list(values)
    checked = []
    for value in values:
        try:
            checked.append(float(validation.check_clip_threshold(value)))
        except ValueError:
            checked = None
            break
    if not checked or any(isinstance(v, str) for v in values):
        raise ValueError(f"`{name}` must be a non-empty list of positive finite numbers. Received: {name}={values!r}")
    return sorted(set(checked))


def check_thresholds(thresholds, modes):
    """`"auto"`, or `{mode: sorted distinct thresholds}` for every mode."""
    if isinstance(thresholds, str):
        if thresholds == "auto":
            return thresholds
        raise ValueError(f"`thresholds` must be 'auto', a list of numbers or a dict mode -> list. "
                         f"Received: thresholds={thresholds!r}")
    if isinstance(thresholds, dict):
        unknown = [m for m in thresholds if m not in modes]
        missing = [m for m in modes if m not in thresholds]
        if unknown or missing:
            raise ValueError(f"`thresholds` as a dict needs exactly the keys of `modes` {list(modes)} "
                             f"(unknown: {unknown}, missing: {missing}). Received: thresholds={thresholds!r}")
        return {m: _check_threshold_list(f"thresholds[{m!r}]", thresholds[m]) for m in modes}
    values = _check_threshold_list("thresholds", thresholds)
    return {m: list(values) for m in modes}


def role():
    """`"single"`, `"chief"` or `"worker"`, from KerasTuner's environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"

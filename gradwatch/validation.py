"""Argument checks with Keras-style messages, shared by the public classes.

Every check raises `ValueError` naming the argument and the value received
(`... Received: name=value`): wrong types (a bool is not an integer), negative,
zero, NaN and infinite numbers, unknown mode names (the message lists the valid
ones). numpy scalars are accepted where Python numbers are and returned as
Python numbers.
"""

import math
import numbers
import os

import numpy as np

from gradwatch import clipping

UPDATE_FREQ_NAMES = ("epoch",)
# Thresholds are used in float32 inside the train step: they must stay positive
# and finite there (an infinite or zero clipping threshold would turn the
# gradient into NaN).
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e+38


def _received(name, value):
    try:
        shown = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        shown = f"<{type(value).__name__} object>"
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return f"Received: {name}={shown}"


def _is_int(value):
    # numpy integers are `numbers.Integral`; bool (and numpy.bool_) are not accepted.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_positive_number(value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        number = float(value)  # a huge int overflows: not a usable threshold
    except (OverflowError, TypeError, ValueError):
        return False
    return math.isfinite(number) and FLOAT32_TINY <= number <= FLOAT32_MAX


def _as_number(value):
    return value if type(value) in (int, float) else (int(value) if _is_int(value) else float(value))


def check_log_dir(log_dir):
    """A non-empty `str` or `os.PathLike` path, without NUL, not an existing file."""
    path = None
    if isinstance(log_dir, (str, os.PathLike)):
        try:
            path = os.fspath(log_dir)
        except TypeError:
            path = None
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("`log_dir` must be a non-empty path (a str or os.PathLike, without NUL "
                         f"characters). {_received('log_dir', log_dir)}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`log_dir` must be a folder, but a file is in its place. "
                         f"{_received('log_dir', log_dir)}")
    return path


def check_update_freq(update_freq):
    if isinstance(update_freq, str) and update_freq in UPDATE_FREQ_NAMES:
        return update_freq
    if _is_int(update_freq) and update_freq > 0:
        return int(update_freq)
    raise ValueError("`update_freq` must be a positive integer or 'epoch'. "
                     f"{_received('update_freq', update_freq)}")


def check_explosion_threshold(value):
    if value is None:
        return None
    if _is_positive_number(value):
        return _as_number(value)
    raise ValueError("`explosion_threshold` must be None (adaptive) or a positive finite number (float32 range, 1.2e-38 to 3.4e38). "
                     f"{_received('explosion_threshold', value)}")


def check_auto_clip(value):
    if value is None or (isinstance(value, str) and value in clipping.MODES):
        return value
    raise ValueError(f"`auto_clip` must be None or one of {', '.join(map(repr, clipping.MODES))}. "
                     f"{_received('auto_clip', value)}")


def check_clip_threshold(value):
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, clipping.AutoThreshold):  # "auto" with settings of its own
        return value
    if _is_positive_number(value):
        return _as_number(value)
    raise ValueError("`clip_threshold` must be a positive finite number (float32 range, 1.2e-38 to 3.4e38), 'auto' "
                     "or a `gradwatch.AutoThreshold`. "
                     f"{_received('clip_threshold', value)}")


def check_bool(name, value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"`{name}` must be True or False. {_received(name, value)}")


def check_optional_bool(name, value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise ValueError(f"`{name}` must be True, False or None. {_received(name, value)}")


def check_culprits(value):
    """`culprits=`: False, "rank" or True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value == "rank":
        return value
    raise ValueError(f"`culprits` must be False, 'rank' or True. {_received('culprits', value)}")


def check_vanishing(value):
    """`vanishing=`: True / False, a `VanishingConfig`, or a dict of its fields
    (as `get_config` returns it); returns a `VanishingConfig` or None (off)."""
    from gradwatch.vanishing import VanishingConfig

    if isinstance(value, (bool, np.bool_)):
        return VanishingConfig() if value else None
    if isinstance(value, VanishingConfig):
        return value
    if isinstance(value, dict):
        try:
            return VanishingConfig(**value)
        except TypeError as error:
            raise ValueError(f"`vanishing` as a dict takes the fields of VanishingConfig ({error}). "
                             f"{_received('vanishing', value)}") from None
    raise ValueError("`vanishing` must be True, False or a gradwatch.vanishing.VanishingConfig. "
                     f"{_received('vanishing', value)}")


def check_int(name, value):
    if _is_int(value):
        return int(value)
    raise ValueError(f"`{name}` must be an integer. {_received(name, value)}")


def check_positive_int(name, value):
    if _is_int(value) and value > 0:
        return int(value)
    raise ValueError(f"`{name}` must be a positive integer. {_received(name, value)}")


def check_sublayers(value):
    """`sublayers`: an integer >= 0 (levels of sublayers reported apart)."""
    if _is_int(value) and value >= 0:
        return int(value)
    raise ValueError(f"`sublayers` must be an integer >= 0 (0: one row per layer). {_received('sublayers', value)}")


def check_verbose(value):
    if isinstance(value, bool):  # Keras callbacks accept verbose=True/False too
        return int(value)
    if _is_int(value) and value in (0, 1, 2):
        return int(value)
    raise ValueError(f"`verbose` must be 0, 1, 2 or a bool. {_received('verbose', value)}")


def check_optimizers(value):
    """None, a non-empty list/tuple of Keras optimizers, or a dict `{name: optimizer}`
    (names usable as run folders); no optimizer twice. Returns None, a list or a dict."""
    from gradwatch.capture import optimizers

    expected = ("`optimizers` must be None, a list of Keras optimizers or a dict {name: optimizer} "
                "whose names are letters, digits, '_', '.' or '-'")
    if value is None:
        return None
    if isinstance(value, dict):
        items = list(value.items())
        if not all(optimizers.is_valid_name(name) for name, _ in items):
            raise ValueError(f"{expected}. {_received('optimizers', value)}")
    elif isinstance(value, (list, tuple)):
        items = [(None, item) for item in value]
    else:
        raise ValueError(f"{expected}. {_received('optimizers', value)}")
    if not items or not all(optimizers.is_optimizer(item) for _, item in items):
        raise ValueError(f"{expected}; got {'an empty collection' if not items else 'a non-optimizer'}. "
                         f"{_received('optimizers', value)}")
    seen = [optimizers.underlying(item) for _, item in items]
    if len({id(item) for item in seen}) != len(seen):
        raise ValueError(f"`optimizers` names the same optimizer twice. {_received('optimizers', value)}")
    return dict(items) if isinstance(value, dict) else [item for _, item in items]

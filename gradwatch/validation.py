"""Argument checks with Keras-style messages, shared by the public classes."""

import math
import os

from gradwatch import clipping


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_log_dir(log_dir):
    if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
        raise ValueError(f"`log_dir` must be a non-empty path. Received: log_dir={log_dir!r}")
    return os.fspath(log_dir)


def check_update_freq(update_freq):
    if update_freq == "epoch" or (_is_int(update_freq) and update_freq > 0):
        return update_freq
    raise ValueError("`update_freq` must be a positive integer or 'epoch'. "
                     f"Received: update_freq={update_freq!r}")


def check_explosion_threshold(value):
    if value is None or _is_positive_number(value):
        return value
    raise ValueError("`explosion_threshold` must be None (adaptive) or a positive number. "
                     f"Received: explosion_threshold={value!r}")


def check_auto_clip(value):
    if value is None or (isinstance(value, str) and value in clipping.MODES):
        return value
    raise ValueError(f"`auto_clip` must be None or one of {', '.join(map(repr, clipping.MODES))}. "
                     f"Received: auto_clip={value!r}")


def check_clip_threshold(value):
    if value == "auto" or _is_positive_number(value):
        return value
    raise ValueError("`clip_threshold` must be a positive number or 'auto'. "
                     f"Received: clip_threshold={value!r}")


def check_optional_bool(name, value):
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"`{name}` must be True, False or None. Received: {name}={value!r}")


def check_positive_int(name, value):
    if _is_int(value) and value > 0:
        return value
    raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def check_verbose(value):
    if value in (0, 1, 2) and not isinstance(value, float):
        return int(value)
    raise ValueError(f"`verbose` must be 0, 1 or 2. Received: verbose={value!r}")

"""Every public argument is checked at construction (issue 7): a `ValueError`
naming the argument and the value received, `Received: <name>=...`."""

import math
import os
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradwatch
from gradwatch import clipping

pytestmark = pytest.mark.core  # also run on the oldest supported versions (.ci/run)

# -- an independent statement of what is valid ---------------------------------

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_threshold(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and FLOAT32_TINY <= number <= FLOAT32_MAX


VALID = {
    "log_dir": lambda v: (isinstance(v, (str, pathlib.PurePath)) and str(v) != "" and "\0" not in str(v)
                          and not os.path.isfile(str(v))),
    "update_freq": lambda v: (isinstance(v, str) and v == "epoch") or (is_int(v) and v > 0),
    "explosion_threshold": lambda v: v is None or is_threshold(v),
    "auto_clip": lambda v: v is None or (isinstance(v, str) and v in clipping.MODES),
    "clip_threshold": lambda v: (isinstance(v, str) and v == "auto") or is_threshold(v),
    "skip_nonfinite": lambda v: v is None or isinstance(v, (bool, np.bool_)),
    "reset_momentum": lambda v: isinstance(v, (bool, np.bool_)),
    "top_layers": lambda v: is_int(v) and v > 0,
    "sublayers": lambda v: is_int(v) and v >= 0,
    "verbose": lambda v: isinstance(v, bool) or (is_int(v) and v in (0, 1, 2)),
}

# -- value generators: valid values, near misses and junk of every type -----------

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.binary(max_size=4), st.lists(st.integers(), max_size=2),
    st.tuples(st.integers()), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.just(object()), st.just(np.nan), st.just(np.float32(2.5)), st.just(np.int64(3)),
    st.just(np.bool_(True)), st.just(np.array([1.0, 2.0])), st.just(np.int32(-1)),
    st.just(1e-40), st.just(1e39), st.just(10**400), st.just(-0.0),
)
names = st.sampled_from(["epoch", "Epoch", "epochs", "batch", "auto", "Auto", "clipnorm", "ClipNorm",
                         "global_clipnorm", "clipvalue", "clip_norm", "", " ", "none"])
VALUES = {
    "log_dir": st.one_of(junk, st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
                         .map(lambda t: os.path.join("/nonexistent-gradwatch", t) if t else t),
                         st.just("a\0b"), st.just(pathlib.Path("/nonexistent-gradwatch/p")),
                         st.just(__file__)),
    "update_freq": st.one_of(junk, names, st.integers(-3, 2000)),
    "explosion_threshold": st.one_of(junk, st.floats(1e-3, 1e6)),
    "auto_clip": st.one_of(junk, names),
    "clip_threshold": st.one_of(junk, names, st.floats(1e-3, 1e6)),
    "skip_nonfinite": junk,
    "reset_momentum": junk,
    "top_layers": st.one_of(junk, st.integers(-2, 50)),
    "sublayers": st.one_of(junk, st.integers(-2, 5)),
    "verbose": st.one_of(junk, st.integers(-1, 3)),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=VALUES))
def test_random_arguments_construct_or_name_the_bad_one(kwargs):
    invalid = [name for name, value in kwargs.items() if not VALID[name](value)]
    if not invalid:
        monitor = gradwatch.GradientMonitor(**kwargs)
        config = monitor.get_config()
        for name, value in kwargs.items():
            if name != "skip_nonfinite":
                assert config[name] == (os.fspath(value) if name == "log_dir" else value)
        return
    with pytest.raises(ValueError) as raised:
        gradwatch.GradientMonitor(**kwargs)
    message = str(raised.value)
    assert any(f"Received: {name}=" in message for name in invalid), (message, invalid)


@given(st.sampled_from(sorted(VALUES)).flatmap(lambda name: st.tuples(st.just(name), VALUES[name])))
@settings(max_examples=300, deadline=None)
def test_each_argument_alone(name_and_value):
    name, value = name_and_value
    kwargs = {name: value}
    if VALID[name](value):
        gradwatch.GradientMonitor(**kwargs)
    else:
        with pytest.raises(ValueError, match=f"Received: {name}="):
            gradwatch.GradientMonitor(**kwargs)


@pytest.mark.parametrize("name, value, shown", [
    ("update_freq", 0, "update_freq=0"),
    ("update_freq", -5, "update_freq=-5"),
    ("update_freq", 2.0, "update_freq=2.0"),
    ("update_freq", True, "update_freq=True"),
    ("update_freq", "epochs", "update_freq='epochs'"),
    ("explosion_threshold", float("nan"), "explosion_threshold=nan"),
    ("explosion_threshold", float("inf"), "explosion_threshold=inf"),
    ("explosion_threshold", 0, "explosion_threshold=0"),
    ("explosion_threshold", -1.0, "explosion_threshold=-1.0"),
    ("explosion_threshold", "10", "explosion_threshold='10'"),
    ("clip_threshold", 0.0, "clip_threshold=0.0"),
    ("clip_threshold", 1e39, "clip_threshold=1e+39"),  # infinite in float32
    ("clip_threshold", True, "clip_threshold=True"),
    ("top_layers", True, "top_layers=True"),
    ("top_layers", 2.5, "top_layers=2.5"),
    ("verbose", 3, "verbose=3"),
    ("skip_nonfinite", 1, "skip_nonfinite=1"),
    ("reset_momentum", 1, "reset_momentum=1"),
    ("reset_momentum", None, "reset_momentum=None"),
    ("log_dir", "", "log_dir=''"),
    ("log_dir", None, "log_dir=None"),
    ("log_dir", b"logs", "log_dir=b'logs'"),
])
def test_message_names_argument_and_value(name, value, shown):
    with pytest.raises(ValueError) as raised:
        gradwatch.GradientMonitor(**{name: value})
    assert f"`{name}`" in str(raised.value) and f"Received: {shown}" in str(raised.value)


@pytest.mark.parametrize("name, value", [("auto_clip", "clip_norm"), ("update_freq", "batch"),
                                         ("clip_threshold", "Auto")])
def test_unknown_mode_names_list_the_valid_ones(name, value):
    valid = {"auto_clip": clipping.MODES, "update_freq": ("epoch",), "clip_threshold": ("auto",)}[name]
    with pytest.raises(ValueError) as raised:
        gradwatch.GradientMonitor(**{name: value})
    assert all(repr(mode) in str(raised.value) for mode in valid)


def test_log_dir_that_is_a_file_is_refused_at_construction(tmp_path):
    path = tmp_path / "logs"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="Received: log_dir=") as raised:
        gradwatch.GradientMonitor(path)
    assert str(path) in str(raised.value)


def test_numpy_scalars_are_plain_numbers():
    monitor = gradwatch.GradientMonitor(update_freq=np.int64(5), top_layers=np.int32(2),
                                        explosion_threshold=np.float32(3.5), verbose=np.int64(0))
    config = monitor.get_config()
    assert config["update_freq"] == 5 and type(config["update_freq"]) is int
    assert type(config["top_layers"]) is int and type(config["explosion_threshold"]) is float


def test_a_broken_repr_does_not_hide_the_error():
    class Odd:
        def __repr__(self):
            raise RuntimeError("no repr")

    with pytest.raises(ValueError, match="Received: top_layers=<Odd object>"):
        gradwatch.GradientMonitor(top_layers=Odd())


def test_clip_threshold_takes_an_auto_threshold_with_its_own_settings(tmp_path):
    rule = gradwatch.AutoThreshold(overshoot_gain=0.5)
    monitor = gradwatch.GradientMonitor(str(tmp_path), auto_clip="clipnorm", clip_threshold=rule)
    assert (monitor.clip_threshold, monitor.auto_threshold) == ("auto", rule)
    assert "AutoThreshold" in gradwatch.__all__
    with pytest.raises(ValueError, match=r"`overshoot_level` must be a number in \[-1, 1\)\. "
                                         r"Received: overshoot_level=1\.5"):
        gradwatch.AutoThreshold(overshoot_level=1.5)
    with pytest.raises(ValueError, match=r"`overshoot_gain` must be a number in \[0, inf\)\. "
                                         r"Received: overshoot_gain=-1"):
        gradwatch.AutoThreshold(overshoot_gain=-1)
    with pytest.raises(ValueError, match=r"`update_ratio` must be a number in \(0, 1\)\. Received: update_ratio=1"):
        gradwatch.AutoThreshold(update_ratio=1)
    assert gradwatch.AutoThreshold(overshoot_gain=0).watches_overshoot  # the updates' size still
    assert not gradwatch.AutoThreshold(overshoot_gain=0, update_gain=0).watches_overshoot

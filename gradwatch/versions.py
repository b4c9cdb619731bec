"""Which Keras, tf_keras and TensorFlow gradwatch supports, checked when a
`GradientMonitor` starts training.

gradwatch hooks private optimizer methods (`gradwatch.capture.keras3`,
`gradwatch.capture.tfkeras`). On a Keras they do not fit, a run would go on
half-working: measured with Keras 3.2-3.4, a NaN update was applied while
gradwatch recorded the step as "skipped". So `check(model)` runs in
`on_train_begin`, before the first step, and raises `UnsupportedVersionError`
naming the version found, the versions supported and the missing piece (for a
version below the floor, its known reason alone) when, for any optimizer the
monitor watches:

- the version is below the floor (`KERAS_FLOOR`, `TF_KERAS_FLOOR`,
  `TENSORFLOW_FLOOR`; pip refuses them too, but a version can be installed past
  pip's resolver, e.g. `pip install keras==3.4.1 --no-deps`);
- a method gradwatch wraps or calls is missing or no longer accepts the
  arguments gradwatch passes (`inspect.signature`), as a future Keras may do;
- (Keras 3) the cross-replica sum `_all_reduce_sum_gradients` is not called
  from `_backend_update_step`, or is called inside
  `_distributed_tf_update_step` (Keras 3.2-3.4): gradwatch's statistics,
  clipping and skip decision are made on its output, so it must run before
  the update.

Why the Keras floor is 3.8 (measured with gradwatch's core tests and by hand):
3.0-3.1 lack `_all_reduce_sum_gradients`; 3.2-3.4 call it inside
`_distributed_tf_update_step`; 3.5-3.7 do not scale the loss per replica under
a distribution strategy (`scale_loss_for_distribution`, Keras 3.8), so the
applied gradient is N times the single-device one on N replicas.

The backend comes first. gradwatch's capture runs inside TensorFlow's compiled
train step (`tf.function`, `tf.cond`, TensorFlow variables), so Keras 3 must run
on its TensorFlow backend. On another backend (`KERAS_BACKEND=jax`, `torch`,
...) the optimizer methods above are missing because they are TensorFlow's, not
because of the Keras version; so `GradientMonitor(...)` and `ClippingSweep(...)`
call `check_backend()` at construction, before any training, and `check()`
calls it before looking at any version: the error is `UnsupportedBackendError`,
naming the backend found and how to switch. A tf_keras model is never refused
(tf_keras always runs on TensorFlow, whatever `KERAS_BACKEND` says).

How Keras 3 picks its backend (`keras/src/backend/config.py`, the same code in
Keras 3.8.0 and 3.15.1; tried by hand on 3.15.1): once, when `keras` is first
imported in the process, from the environment variable `KERAS_BACKEND` if set
and not empty, else from the `"backend"` entry of `keras.json` in `$KERAS_HOME`
(default `~/.keras`), else `"tensorflow"`. Changing `KERAS_BACKEND` after the
import does nothing.

Everything but `check()` and `check_backend()` is pure (no Keras import) and
tested with doctests.
"""

import inspect
import json
import os
import re
import sys

KERAS_FLOOR = (3, 8)
TF_KERAS_FLOOR = (2, 16)
TENSORFLOW_FLOOR = (2, 16)
# Versions CI tests: the oldest (`.ci/oldest.txt`) and the newest combination.
TESTED = {"TensorFlow": ("2.16.1", "2.21.0"), "Keras": ("3.8.0", "3.15.1"), "tf_keras": ("2.16.0", "2.21.0")}

# What Keras 3 versions below the floor lack, by (first, last) minor version.
_KERAS_GAPS = (
    ((3, 0), (3, 1), "the optimizer method `_all_reduce_sum_gradients` (the cross-replica sum gradwatch "
                     "hooks; added in Keras 3.2)"),
    ((3, 2), (3, 4), "`_all_reduce_sum_gradients` called from `_backend_update_step` before the update "
                     "(Keras 3.2-3.4 call it inside `_distributed_tf_update_step`, after the point where "
                     "gradwatch decides to skip a step: a NaN update would be applied and recorded as "
                     "skipped)"),
    ((3, 5), (3, 7), "per-replica loss scaling under a distribution strategy (`scale_loss_for_distribution`, "
                     "Keras 3.8): without it the applied gradient is N times too large on N replicas"),
)

# (method, the arguments gradwatch calls it with / lets Keras call its wrapper with).
KERAS_METHODS = (
    ("_all_reduce_sum_gradients", ("grads_and_vars",)),
    ("_backend_update_step", ("grads", "trainable_variables", "learning_rate")),
    ("_clip_gradients", ("grads",)),
    ("_distributed_tf_update_step", ("distribution", "grads_and_vars", "learning_rate")),
)
KERAS_LOSS_SCALE_METHODS = (("_stateful_handle_non_finite_grads", ()),)
TF_KERAS_METHODS = (
    ("apply_gradients", ("grads_and_vars",)),
    ("_clip_gradients", ("grads",)),
    ("_update_step", ("gradient", "variable")),
    ("_apply_weight_decay", ("variables",)),
    ("_use_weight_decay", ("variable",)),
    ("_var_key", ("variable",)),
)
TF_KERAS_LEGACY_METHODS = (
    ("_transform_gradients", ("grads_and_vars",)),
    ("_resource_apply_dense", ("grad", "handle", "apply_state")),
    ("_resource_apply_sparse_duplicate_indices", ("grad", "handle", "indices")),
)
TF_KERAS_LOSS_SCALE_METHODS = (("update", ("grads",)),)


class UnsupportedVersionError(RuntimeError):
    """Raised by `GradientMonitor` when training starts (from `model.fit`,
    before the first step) on a Keras, tf_keras or TensorFlow version gradwatch
    does not support, or whose private optimizer methods changed.

    A `RuntimeError`: the versions are found at run time, in the `fit()` that
    uses them; importing gradwatch still works. The message names the version
    found, the versions supported and the missing piece.

    A Keras 3 on another backend than TensorFlow raises `UnsupportedBackendError`
    instead, whatever its version.
    """

    __module__ = "gradwatch"  # the public name, in tracebacks: gradwatch.UnsupportedVersionError


class UnsupportedBackendError(RuntimeError):
    """Raised when Keras 3 runs on another backend than TensorFlow (JAX,
    PyTorch, ...): by `GradientMonitor(...)` and `ClippingSweep(...)` when they
    are constructed, before any training, and, as a backstop, by
    `GradientMonitor` when the training of a Keras 3 model starts.

    gradwatch records and clips gradients inside TensorFlow's compiled train
    step, so it needs Keras' TensorFlow backend. The message names the backend
    found (`keras.backend.backend()`), where it was set, and how to switch:
    set the environment variable `KERAS_BACKEND=tensorflow` before Keras is
    first imported (it takes precedence over `~/.keras/keras.json`).

    A `RuntimeError`, like `UnsupportedVersionError`: the backend is found at
    run time; importing gradwatch still works, and so does reading logs
    (`gradwatch report`, the TensorBoard dashboard), on any backend. A tf_keras
    model is never refused: tf_keras always runs on TensorFlow.
    """

    __module__ = "gradwatch"  # the public name, in tracebacks: gradwatch.UnsupportedBackendError


def parse_version(text):
    """The leading `(major, minor, patch)` numbers of a version string, or None.

    >>> parse_version("3.8.0")
    (3, 8, 0)
    >>> parse_version("3.10.0.dev2025010203")
    (3, 10, 0)
    >>> parse_version("2.16.0rc1")
    (2, 16, 0)
    >>> parse_version("3.4")
    (3, 4, 0)
    >>> parse_version("unknown") is None
    True
    """
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


def keras_floor_problem(version):
    """What a Keras 3 `version` (a tuple) below `KERAS_FLOOR` lacks, or None.

    >>> keras_floor_problem((3, 8, 0)) is None
    True
    >>> keras_floor_problem((3, 15, 1)) is None
    True
    >>> keras_floor_problem((3, 4, 1)).split(" (")[0]
    '`_all_reduce_sum_gradients` called from `_backend_update_step` before the update'
    >>> keras_floor_problem((3, 1, 1)).split(" (")[0]
    'the optimizer method `_all_reduce_sum_gradients`'
    >>> keras_floor_problem((3, 7, 0)).split(" (")[0]
    'per-replica loss scaling under a distribution strategy'
    >>> keras_floor_problem((2, 15, 0))
    'Keras 3 (this is Keras 2: use it through tf_keras instead)'
    """
    if version[:2] >= KERAS_FLOOR:
        return None
    if version[0] < 3:
        return "Keras 3 (this is Keras 2: use it through tf_keras instead)"
    for first, last, missing in _KERAS_GAPS:
        if first <= version[:2] <= last:
            return missing
    return f"Keras {_floor_text(KERAS_FLOOR)} or newer"


def floor_problem(name, version_text, floor):
    """A problem if `version_text` of `name` is below `floor`, else None.

    >>> floor_problem("tf_keras", "2.21.0", (2, 16)) is None
    True
    >>> floor_problem("tf_keras", "2.15.1", (2, 16))
    'tf_keras 2.16 or newer'
    >>> floor_problem("TensorFlow", "nightly", (2, 16))
    "a TensorFlow version number (found 'nightly')"
    """
    version = parse_version(version_text)
    if version is None:
        return f"a {name} version number (found {version_text!r})"
    if version[:2] < floor:
        return f"{name} {_floor_text(floor)} or newer"
    return None


def signature_problem(cls, name, args):
    """Why `cls.name` cannot be called as gradwatch does (`name(*args)`), or None.

    >>> class Optimizer:
    ...     def _clip_gradients(self, grads):
    ...         return grads
    ...     def _update_step(self, gradient, variable, learning_rate):
    ...         pass
    >>> signature_problem(Optimizer, "_clip_gradients", ("grads",)) is None
    True
    >>> signature_problem(Optimizer, "_all_reduce_sum_gradients", ("grads_and_vars",))
    'the optimizer method `Optimizer._all_reduce_sum_gradients` (missing)'
    >>> signature_problem(Optimizer, "_update_step", ("gradient", "variable"))
    'the optimizer method `Optimizer._update_step(gradient, variable)` (found `_update_step(self, gradient, variable, learning_rate)`)'
    """
    where = f"`{cls.__name__}.{name}"
    method = getattr(cls, name, None)
    if method is None or not callable(method):
        return f"the optimizer method {where}` (missing)"
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):  # a builtin without a signature: cannot tell
        return None
    try:
        signature.bind(object(), *args)
    except TypeError:
        return (f"the optimizer method {where}({', '.join(args)})` "
                f"(found `{name}{signature}`)")
    return None


def all_reduce_order_problem(update_step_source, distributed_step_source):
    """Keras 3: why the cross-replica sum does not run where gradwatch needs it
    (called from `_backend_update_step`, before `_distributed_tf_update_step`),
    from the source of those two methods; None if right or unknown (no source).

    >>> keras_3_8 = "grads_and_vars = self._all_reduce_sum_gradients(grads_and_vars)"
    >>> all_reduce_order_problem(keras_3_8, "distribution.extended.update(var, ...)") is None
    True
    >>> keras_3_4 = all_reduce_order_problem("maybe_merge_call(...)", keras_3_8)
    >>> keras_3_4 == keras_floor_problem((3, 4, 1))
    True
    >>> all_reduce_order_problem(None, keras_3_8) is None  # no source: the version floor decides
    True
    """
    call = "_all_reduce_sum_gradients("
    if update_step_source is None or distributed_step_source is None:
        return None
    if call in distributed_step_source or call not in update_step_source:
        return _KERAS_GAPS[1][2]
    return None


def _floor_text(floor):
    return ".".join(str(part) for part in floor)


def supported_text(name):
    """The supported range of `name`, for messages.

    >>> supported_text("Keras")
    'Keras >= 3.8 (tested: 3.8.0 and 3.15.1) with TensorFlow >= 2.16'
    >>> supported_text("tf_keras")
    'tf_keras >= 2.16 (tested: 2.16.0 and 2.21.0) with TensorFlow >= 2.16'
    """
    floor = {"Keras": KERAS_FLOOR, "tf_keras": TF_KERAS_FLOOR, "TensorFlow": TENSORFLOW_FLOOR}[name]
    oldest, newest = TESTED[name]
    text = f"{name} >= {_floor_text(floor)} (tested: {oldest} and {newest})"
    if name != "TensorFlow":
        text += f" with TensorFlow >= {_floor_text(TENSORFLOW_FLOOR)}"
    return text


def error_message(name, version_text, problems):
    """The `UnsupportedVersionError` message.

    >>> print(error_message("Keras", "3.4.1", ["the piece"]))
    gradwatch does not support Keras 3.4.1: it needs the piece. Supported: Keras >= 3.8 (tested: 3.8.0 and 3.15.1) with TensorFlow >= 2.16. Install a supported version, e.g. `pip install "keras>=3.8"`, or train without GradientMonitor.
    """
    package = {"Keras": "keras", "tf_keras": "tf_keras", "TensorFlow": "tensorflow"}[name]
    floor = {"Keras": KERAS_FLOOR, "tf_keras": TF_KERAS_FLOOR, "TensorFlow": TENSORFLOW_FLOOR}[name]
    return (f"gradwatch does not support {name} {version_text}: it needs {'; and '.join(problems)}. "
            f"Supported: {supported_text(name)}. Install a supported version, e.g. "
            f"`pip install \"{package}>={_floor_text(floor)}\"`, or train without GradientMonitor.")


def backend_error_message(backend, env_backend=None, config_path=None, config_backend=None):
    """The `UnsupportedBackendError` message for Keras 3 running on `backend`,
    or None for `"tensorflow"`.

    Args:
        backend: `keras.backend.backend()`.
        env_backend: the environment variable `KERAS_BACKEND` now (None if unset).
        config_path: the path of Keras' `keras.json`.
        config_backend: its `"backend"` entry (None if none or unreadable).

    >>> backend_error_message("tensorflow") is None
    True
    >>> print(backend_error_message("jax", env_backend="jax"))
    gradwatch needs Keras' TensorFlow backend; this Keras runs on the "jax" backend (keras.backend.backend() == "jax", set by the environment variable KERAS_BACKEND=jax). Set the environment variable KERAS_BACKEND=tensorflow before Keras is first imported, e.g. `KERAS_BACKEND=tensorflow python train.py`, or `os.environ["KERAS_BACKEND"] = "tensorflow"` before the first `import keras` (in a notebook: restart the kernel, then set it in the first cell); it takes precedence over the "backend" entry of ~/.keras/keras.json. Reading logs (`gradwatch report`, the TensorBoard dashboard) works on any backend.
    >>> message = backend_error_message("torch", None, "/home/me/.keras/keras.json", "torch")
    >>> message.split("; ")[1].split(". ")[0]
    'this Keras runs on the "torch" backend (keras.backend.backend() == "torch", set by "backend": "torch" in /home/me/.keras/keras.json)'
    >>> message.split("first cell); ")[1].split(". ")[0]
    'it takes precedence over /home/me/.keras/keras.json, or set "backend": "tensorflow" there'
    >>> "set by" in backend_error_message("jax", "tensorflow", "/k/keras.json", None)  # changed after the import
    False
    """
    if backend == "tensorflow":
        return None
    in_config = bool(config_path) and config_backend == backend
    if env_backend and env_backend == backend:
        source = f", set by the environment variable KERAS_BACKEND={backend}"
    elif in_config:
        source = f', set by "backend": "{backend}" in {config_path}'
    else:
        source = ""
    precedence = (f'it takes precedence over {config_path}, or set "backend": "tensorflow" there' if in_config
                  else 'it takes precedence over the "backend" entry of ~/.keras/keras.json')
    return (f"gradwatch needs Keras' TensorFlow backend; this Keras runs on the \"{backend}\" backend "
            f"(keras.backend.backend() == \"{backend}\"{source}). Set the environment variable "
            "KERAS_BACKEND=tensorflow before Keras is first imported, e.g. "
            "`KERAS_BACKEND=tensorflow python train.py`, or `os.environ[\"KERAS_BACKEND\"] = \"tensorflow\"` "
            "before the first `import keras` (in a notebook: restart the kernel, then set it in the first "
            f"cell); {precedence}. Reading logs (`gradwatch report`, the TensorBoard dashboard) "
            "works on any backend.")


# -- the checks (import Keras / tf_keras / TensorFlow) ------------------------
def check_backend(model=None, *, tf_keras_imported_ok=False):
    """Raises `UnsupportedBackendError` if Keras 3 runs on another backend
    than TensorFlow (see the module docstring).

    Args:
        model: the model to be trained, if known: a tf_keras model always
            passes (tf_keras runs on TensorFlow whatever Keras 3's backend).
        tf_keras_imported_ok: with no model yet (at construction): pass when
            tf_keras has been imported, as the model may be a tf_keras one
            (a Keras 3 model is then refused when training starts).
    """
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None and (
            (model is None and tf_keras_imported_ok) or isinstance(model, tf_keras.Model)):
        return
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    config_path, config_backend = _keras_config(keras)
    raise UnsupportedBackendError(backend_error_message(
        backend, os.environ.get("KERAS_BACKEND") or None, config_path, config_backend))


def _keras_config(keras):
    """(path of Keras' keras.json, its "backend" entry or None)."""
    try:
        from keras.src.backend import config

        home = config.keras_home()
    except (ImportError, AttributeError):
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    path = os.path.expanduser(os.path.join(home, "keras.json"))
    try:
        with open(path) as file:
            entry = json.load(file).get("backend")
    except (OSError, ValueError, AttributeError):
        entry = None
    return path, entry if isinstance(entry, str) else None


def check(model, optimizers=None):
    """Raises `UnsupportedVersionError` if gradwatch cannot monitor `model`'s
    training with the installed versions (see the module docstring), or first
    `UnsupportedBackendError` if Keras 3 does not run on TensorFlow (a Keras 3
    model; never a tf_keras one).

    Args:
        model: a Keras 3 or tf_keras model.
        optimizers: the optimizers gradwatch will hook (a loss-scale optimizer
            as itself); default `[model.optimizer]`.
    """
    check_backend(model)  # first: never blame the version for the backend
    import tensorflow as tf

    from gradwatch.capture import is_tf_keras_model

    problem = floor_problem("TensorFlow", tf.__version__, TENSORFLOW_FLOOR)
    if problem:
        raise UnsupportedVersionError(error_message("TensorFlow", tf.__version__, [problem]))
    if optimizers is None:
        optimizers = [model.optimizer]
    if is_tf_keras_model(model):
        import tf_keras

        name, version_text = "tf_keras", getattr(tf_keras, "__version__", "unknown")
        problems = [floor_problem(name, version_text, TF_KERAS_FLOOR)]
        for optimizer in optimizers:
            problems += _tf_keras_method_problems(tf_keras, optimizer)
    else:
        import keras

        name, version_text = "Keras", keras.__version__
        version = parse_version(version_text)
        problems = [keras_floor_problem(version) if version else floor_problem(name, version_text, KERAS_FLOOR)]
        for optimizer in optimizers:
            problems += _keras_method_problems(optimizer)
    if problems[0]:  # below the floor: its known reason says what is missing
        problems = problems[:1]
    problems = list(dict.fromkeys(p for p in problems if p))  # in order, once each
    if problems:
        raise UnsupportedVersionError(error_message(name, version_text, problems))


def _keras_method_problems(optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    problems = [signature_problem(type(inner), *m) for m in KERAS_METHODS]
    if inner is not optimizer:
        problems += [signature_problem(type(optimizer), *m) for m in KERAS_LOSS_SCALE_METHODS]
    problems.append(_keras_all_reduce_order(type(inner)))
    return problems


def _tf_keras_method_problems(tf_keras, optimizer):
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(inner, tf_keras.optimizers.legacy.Optimizer):
        methods = TF_KERAS_LEGACY_METHODS
    elif isinstance(inner, tf_keras.optimizers.Optimizer):
        methods = TF_KERAS_METHODS
    else:  # not a tf_keras optimizer: the capture refuses it (ValueError)
        methods = ()
    problems = [signature_problem(type(inner), *m) for m in methods]
    loss_scale = getattr(optimizer, "_loss_scale", None) if inner is not optimizer else None
    if loss_scale is not None:
        problems += [signature_problem(type(loss_scale), *m) for m in TF_KERAS_LOSS_SCALE_METHODS]
    return problems


def _keras_all_reduce_order(cls):
    """`all_reduce_order_problem` for the Keras class in `cls`'s bases that
    defines `_all_reduce_sum_gradients` (Keras' TensorFlow optimizer; a
    subclass may override the update step and call `super()`)."""
    base = next((c for c in cls.__mro__ if "_all_reduce_sum_gradients" in vars(c)), None)
    if base is None:  # reported as missing by the method check
        return None
    return all_reduce_order_problem(_source(base, "_backend_update_step"),
                                    _source(base, "_distributed_tf_update_step"))


def _source(cls, name):
    try:
        return inspect.getsource(getattr(cls, name))
    except (AttributeError, OSError, TypeError):
        return None

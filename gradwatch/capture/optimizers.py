"""Which optimizers a `GradientMonitor` watches, and the name each goes by.

With `optimizers=None` the monitor watches every optimizer the model holds:
`model.optimizer` and the optimizers that are attributes of the model (or sit
in a list, tuple or dict attribute), as in keras-io's GAN examples, where a
custom `train_step` applies `self.d_optimizer` and `self.g_optimizer`. Each
is named by the attribute that holds it (`"optimizer"` for `model.optimizer`
when no other attribute holds it). An optimizer wrapped by a loss-scale
optimizer is the same optimizer as its wrapper: it is watched once, through
the wrapper.

Nothing here imports tf_keras unless it is loaded already.
"""

import re
import sys

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}")


def is_optimizer(obj):
    """True for a Keras 3 or tf_keras optimizer (a loss-scale optimizer included)."""
    import keras

    if isinstance(obj, keras.optimizers.Optimizer):
        return True
    tf_keras = sys.modules.get("tf_keras")
    return tf_keras is not None and isinstance(
        obj, (tf_keras.optimizers.Optimizer, tf_keras.optimizers.legacy.Optimizer))


def underlying(optimizer):
    """The optimizer that does the update: the inner one of a loss-scale optimizer."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def is_valid_name(name):
    """A name usable as a run folder: letters, digits, `_`, `.`, `-`; not starting with `.` or `-`.

    >>> is_valid_name("d_optimizer"), is_valid_name("../x"), is_valid_name("")
    (True, False, False)
    """
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def held_optimizers(model):
    """`[(name, optimizer)]` of the optimizers `model` holds, `model.optimizer` first.

    The same optimizer held twice (e.g. `compile(optimizer=self.g_optimizer)`) is
    listed once, under its own attribute's name; a loss-scale optimizer and the
    optimizer it wraps are listed once, as the wrapper.
    """
    found = []  # [name, optimizer]

    def add(name, optimizer):
        if not is_optimizer(optimizer):
            return
        for entry in found:
            if underlying(entry[1]) is underlying(optimizer):
                if entry[0] == "optimizer" and name != "optimizer":
                    entry[0] = name  # its own attribute names it better
                if underlying(entry[1]) is entry[1] and optimizer is not entry[1]:
                    entry[1] = optimizer  # the wrapper applies the update
                return
        found.append([name, optimizer])

    add("optimizer", getattr(model, "optimizer", None))
    for attribute, value in list(vars(model).items()):
        if attribute.startswith("_"):
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                add(f"{attribute}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                add(f"{attribute}.{index}", item)
        else:
            add(attribute, value)
    return [(_clean(name), optimizer) for name, optimizer in found]


def named_optimizers(model, optimizers):
    """`[(name, optimizer)]` to watch: those `model` holds when `optimizers` is None,
    else the given list (each named as the model holds it, else by its `name`) or
    dict `{name: optimizer}`. Names are made unique with `_1`, `_2`, ..."""
    if optimizers is None:
        return held_optimizers(model)
    if isinstance(optimizers, dict):
        return list(optimizers.items())
    held = {id(underlying(optimizer)): name for name, optimizer in held_optimizers(model)}
    named, used = [], set()
    for optimizer in optimizers:
        name = held.get(id(underlying(optimizer))) or _clean(str(getattr(optimizer, "name", "")) or "optimizer")
        unique, number = name, 1
        while unique in used:
            unique, number = f"{name}_{number}", number + 1
        used.add(unique)
        named.append((unique, optimizer))
    return named


def _clean(name):
    """`name` made a valid run folder name.

    >>> _clean("my opt/1")
    'my_opt_1'
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:100].lstrip(".-")
    return cleaned or "optimizer"

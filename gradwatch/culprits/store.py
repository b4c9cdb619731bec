"""What culprits put in the run folder.

With `culprits="rank"` and `culprits=True` (nothing with the default `False`): the ranking, in the
explosion's record of the event file (`gradwatch/explosions`, key `culprits`:
`[{"index", "loss", "grad_norm", "share"}, ...]`, every sample of the batch,
ranked; and `culprits_summary`, the alert's words). Indices, losses and
gradient norms only: no sample content.

Only with `culprits=True`, in `<run folder>/culprits/`:

- `step-<step>.npz` (NumPy, no pickles: `np.load(path)` works with the
  default `allow_pickle=False`): the kept batch, one array per input leaf,
  named `x`, `y`, `sample_weight` or `x.<key>` / `x.<position>` for dicts and
  tuples (`load_batch` rebuilds `(x, y, sample_weight)`). Written only for
  batches of at most `ARRAYS_MAX_BYTES`; larger ones keep their ranking and
  previews.
- in the event record, `preview` on the first `PREVIEWS` ranked culprits:
  `{"inputs": [{"name", "kind": "image", "png": <base64 PNG, at most
  THUMBNAIL px a side>} or {"name", "kind": "values", "shape", "values":
  <first PREVIEW_VALUES values>}], "target": [...] or None}`.

The kept batches are bounded by `gradwatch.culprits.book`: arrays files are
written for the held batches only -- the first `FIRST_KEPT` and the
`WORST_KEPT` worst later ones per `fit()` and optimizer (a batch pushed out of
the worst few has its file removed; its event record, already written, still
names it).
"""

import base64
import math
import os

import numpy as np

from gradwatch.culprits.ranking import unpack

FOLDER = "culprits"
ARRAYS_MAX_BYTES = 16 * 2**20
PREVIEWS = 5
PREVIEW_VALUES = 16
THUMBNAIL = 64


def _named_leaves(prefix, value):
    if value is None:
        return []
    if isinstance(value, dict):
        return [item for key in sorted(value) for item in _named_leaves(f"{prefix}.{key}", value[key])]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _named_leaves(f"{prefix}.{i}", v)]
    return [(prefix, np.asarray(value))]


def named_arrays(data):
    """`[(name, array)]` of a batch (see the module for the names)."""
    x, y, sample_weight = unpack(data)
    return (_named_leaves("x", x) + _named_leaves("y", y) + _named_leaves("sample_weight", sample_weight))


def _finite_list(values):
    return [float(v) if math.isfinite(float(v)) else str(float(v)) for v in values]


def _is_image(sample):
    return (sample.ndim == 3 and sample.shape[-1] in (1, 3, 4) and min(sample.shape[:2]) >= 8) or (
        sample.ndim == 2 and min(sample.shape) >= 8)


def thumbnail_png(sample):
    """A base64 PNG of an image-like sample (HxW or HxWxC), scaled to 0-255 over
    its finite range, at most `THUMBNAIL` px a side (every k-th pixel)."""
    import tensorflow as tf

    image = np.asarray(sample, np.float64)
    if image.ndim == 2:
        image = image[..., None]
    stride = max(1, math.ceil(max(image.shape[:2]) / THUMBNAIL))
    image = image[::stride, ::stride]
    finite = np.isfinite(image)
    low = image[finite].min() if finite.any() else 0.0
    high = image[finite].max() if finite.any() else 1.0
    scaled = np.where(finite, (image - low) / (high - low if high > low else 1.0), 0.0)
    pixels = np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    return base64.b64encode(tf.io.encode_png(pixels).numpy()).decode("ascii")


def preview(data, index):
    """The preview of sample `index` of a batch (see the module)."""
    x, y, _ = unpack(data)
    inputs = []
    for name, array in _named_leaves("x", x):
        if array.ndim == 0 or index >= len(array):
            continue
        sample = array[index]
        if np.issubdtype(sample.dtype, np.number) and _is_image(sample):
            inputs.append({"name": name, "kind": "image", "png": thumbnail_png(sample)})
        elif np.issubdtype(sample.dtype, np.number) or sample.dtype == np.bool_:
            flat = np.asarray(sample, np.float64).ravel()
            inputs.append({"name": name, "kind": "values", "shape": list(sample.shape),
                           "values": _finite_list(flat[:PREVIEW_VALUES])})
    target = None
    leaves = _named_leaves("y", y)
    if leaves:
        target = []
        for name, array in leaves:
            if array.ndim and index < len(array) and np.issubdtype(array.dtype, np.number):
                target += _finite_list(np.asarray(array[index], np.float64).ravel()[:PREVIEW_VALUES])
    return {"inputs": inputs, "target": target}


def previews(data, culprits, count=PREVIEWS):
    """`{index: preview}` of the first `count` ranked culprits."""
    return {c.index: preview(data, c.index) for c in list(culprits)[:count]}


def write_batch(run_dir, step, data):
    """Writes `step-<step>.npz` under `run_dir/culprits/`; returns its path, or
    None when the batch is larger than `ARRAYS_MAX_BYTES`."""
    arrays = named_arrays(data)
    if sum(a.nbytes for _, a in arrays) > ARRAYS_MAX_BYTES:
        return None
    folder = os.path.join(run_dir, FOLDER)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{int(step)}.npz")
    clean = {name: a for name, a in arrays if a.dtype != object}
    with open(path + ".tmp", "wb") as handle:
        np.savez_compressed(handle, **clean)
    os.replace(path + ".tmp", path)
    return path


def load_batch(path):
    """`(x, y, sample_weight)` of a `step-<step>.npz` written by `write_batch`
    (NumPy arrays; dicts for `x.<key>` names, tuples for `x.<position>`)."""
    with np.load(path, allow_pickle=False) as stored:
        names = list(stored.files)
        parts = {}
        for name in names:
            head, _, rest = name.partition(".")
            parts.setdefault(head, []).append((rest, stored[name]))
    return tuple(_rebuild(parts.get(part)) for part in ("x", "y", "sample_weight"))


def _rebuild(items):
    if not items:
        return None
    if len(items) == 1 and items[0][0] == "":
        return items[0][1]
    groups = {}
    for rest, array in items:
        head, _, tail = rest.partition(".")
        groups.setdefault(head, []).append((tail, array))
    built = {key: _rebuild(value) for key, value in groups.items()}
    if all(key.isdigit() for key in built):
        return tuple(built[key] for key in sorted(built, key=int))
    return built

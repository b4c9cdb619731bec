"""Realistic synthetic gradwatch logs, for tests and screenshots.

Writes what the monitor writes (see `gradwatch.tags`): per-layer and global
norms every step, an adaptive threshold after warm-up, one explosion that
switches clipping on, a non-finite step that is skipped, and the JSON records.
"""

import math
import os

import numpy as np

from gradwatch import summaries, tags

LAYERS = (
    "embedding", "encoder/lstm", "encoder/lstm_1", "encoder/dense",
    "attention/query", "attention/key", "attention/value", "decoder/lstm",
    "decoder/dense", "head",
)
STEPS = 600
WARMUP = 50
EXPLOSION_STEP = 400     # switches clipping on
NAN_STEP = 520           # non-finite gradient, update skipped
NAN_LAYER = "decoder/lstm"
FLUSH_EVERY = 20       # 30 flushes: more than the 10 samples TensorBoard keeps by default


def _layer_norms(rng, steps):
    """steps x layers array of plausible, slowly decaying, noisy norms."""
    scales = np.geomspace(0.02, 3.0, len(LAYERS))[rng.permutation(len(LAYERS))]
    decay = 1.0 + 2.0 * np.exp(-np.arange(1, steps + 1) / 150.0)
    noise = rng.lognormal(0.0, 0.25, size=(steps, len(LAYERS)))
    norms = scales[None, :] * decay[:, None] * noise
    norms[EXPLOSION_STEP - 1, LAYERS.index("encoder/lstm_1")] *= 400.0
    norms[EXPLOSION_STEP - 1, LAYERS.index("encoder/lstm")] *= 60.0
    norms[EXPLOSION_STEP + 30 - 1, LAYERS.index("encoder/dense")] *= 80.0  # clipped
    return norms


# A 4x4 grey PNG: the preview of the synthetic culprit (`gradwatch.culprits.store`).
THUMBNAIL = "iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAAAAACMmsGiAAAAEElEQVR4nGNsYGBgYGJAIQAJ5ACIUhZOXwAAAABJRU5ErkJggg=="


def _record(step, norms_row, global_norm, threshold, action):
    pairs = sorted(zip(LAYERS, norms_row), key=lambda p: (math.isfinite(p[1]), -p[1] if math.isfinite(p[1]) else 0))
    record = {
        "step": step, "epoch": (step - 1) // 100,
        "global_norm": summaries.json_safe(global_norm),
        "threshold": summaries.json_safe(threshold),
        "layers": [[path, summaries.json_safe(norm)] for path, norm in pairs],
        "action": action,
    }
    if action == tags.ACTION_CLIP_ON:  # the first explosion: its batch kept and ranked (culprits=True)
        record["culprits_summary"] = "sample 17 of the batch carries 96% of the gradient (loss 3.6e+03 vs a batch median of 0.8)"
        record["batch_size"] = 32
        record["culprits"] = [
            {"index": 17, "loss": 3600.0, "grad_norm": 950.0, "share": 0.96,
             "preview": {"inputs": [{"name": "x", "kind": "image", "png": THUMBNAIL}], "target": [7.0]}},
            {"index": 3, "loss": 0.9, "grad_norm": 1.2, "share": 0.0012,
             "preview": {"inputs": [{"name": "x", "kind": "values", "shape": [3], "values": [0.1, -0.4, 2.0]}],
                         "target": [1.0]}},
        ]
    return record


def write_run(run_dir, seed=0):
    """Writes one synthetic run into `run_dir`; returns a dict of the facts a test checks."""
    rng = np.random.default_rng(seed)
    norms = _layer_norms(rng, STEPS)
    norms[NAN_STEP - 1, LAYERS.index(NAN_LAYER)] = math.nan
    writer = summaries.EventWriter(run_dir)
    writer.write_json(0, tags.LAYERS, list(LAYERS))
    explosions, clipping, pending, threshold, clip_on = [], [], [], math.inf, False
    for step in range(1, STEPS + 1):
        row = norms[step - 1]
        global_norm = float(np.sqrt(np.sum(row.astype(np.float64) ** 2)))
        values = {tags.layer_tag(path): float(norm) for path, norm in zip(LAYERS, row)}
        values[tags.GLOBAL] = global_norm
        if step > WARMUP:
            values[tags.THRESHOLD] = threshold
        exploding = step > WARMUP and (global_norm > threshold or not math.isfinite(global_norm))
        if exploding:
            values[tags.EXPLOSION] = 1.0
            action = (tags.ACTION_SKIPPED if not math.isfinite(global_norm)
                      else tags.ACTION_CLIPPED if clip_on else tags.ACTION_CLIP_ON)
            pending.append(_record(step, row, global_norm, threshold, action))
            if action == tags.ACTION_CLIP_ON:
                clip_on = True
                clip_threshold = threshold
                clipping.append({"step": step, "epoch": (step - 1) // 100, "mode": "global_norm",
                                 "threshold": threshold, "cause_step": step})
                writer.write_json(step, tags.CLIPPING, clipping[-1:])
        if clip_on:
            values[tags.CLIP_THRESHOLD] = clip_threshold
            values[tags.GLOBAL_CLIPPED] = min(global_norm, clip_threshold) if math.isfinite(global_norm) else 0.0
        if step == NAN_STEP:
            values[tags.OVERFLOW] = 1.0
        writer.write_scalars(step, values)
        if step >= WARMUP and math.isfinite(global_norm) and not exploding:
            recent = norms[max(0, step - WARMUP):step]
            history = np.sqrt(np.nansum(recent.astype(np.float64) ** 2, axis=1))
            threshold = float(np.median(history) * 4.0)
        if step % FLUSH_EVERY == 0:
            writer.write_json(step, tags.EXPLOSIONS, pending)
            explosions.extend(pending)
            pending = []
    writer.close()
    return {"layers": list(LAYERS), "explosion_steps": [r["step"] for r in explosions],
            "norms": norms, "clipping_steps": [c["step"] for c in clipping]}


def write_sweep(root, trials=22, steps=60, seed=0):
    """Writes a clipping-sweep-like folder: `root/clipping_sweep/trial_NN/train` runs.

    Each trial has its own global-norm level (`(trial + 1) * 0.1` times a noisy
    decay); trial 3 explodes at step 40 (norm x 1000). Returns run name ->
    {"steps", "global" (float32 array), "explosion_steps"}.
    """
    rng = np.random.default_rng(seed)
    facts = {}
    for trial in range(trials):
        name = "clipping_sweep/trial_%02d/%s" % (trial, tags.TRAIN_RUN)
        norms = ((trial + 1) * 0.1 * (1.0 + np.exp(-np.arange(steps) / 20.0))
                 * rng.lognormal(0.0, 0.1, steps)).astype(np.float32)
        exploding = [40] if trial == 3 else []
        for step in exploding:
            norms[step - 1] *= 1000.0
        writer = summaries.EventWriter(os.path.join(root, name))
        writer.write_json(0, tags.LAYERS, ["dense"])
        for step in range(1, steps + 1):
            values = {tags.GLOBAL: float(norms[step - 1]), tags.layer_tag("dense"): float(norms[step - 1])}
            if step in exploding:
                values[tags.EXPLOSION] = 1.0
            writer.write_scalars(step, values)
        writer.close()
        facts[name] = {"steps": np.arange(1, steps + 1), "global": norms, "explosion_steps": exploding}
    return facts


if __name__ == "__main__":
    import sys
    print(write_run(os.path.join(sys.argv[1], tags.TRAIN_RUN))["explosion_steps"])

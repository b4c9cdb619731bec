"""The one home of gradwatch's TensorBoard tag names and record formats.

Imported by the monitor (writer), by `gradwatch report` and by the TensorBoard
plugin (readers). Importing this module does not import TensorFlow.

Scalar series (plugin "scalars", so the Scalars tab shows them; one value per
training step unless said otherwise). The step of every value is the optimizer
iteration count after that step's update, counted from 1 -- the step Keras'
`TensorBoard` callback uses for its `batch_*` summaries.

| tag                          | value                                                        |
| ---------------------------- | ------------------------------------------------------------ |
| `grad_norm/global`           | L2 norm of the whole gradient, before any clipping           |
| `grad_norm/<layer path>`     | L2 norm over one layer's trainable variables, pre-clip       |
| `grad_norm/global_clipped`   | global norm after gradwatch's clipping (when `auto_clip` set)|
| `grad_norm/threshold`        | explosion threshold in force (absent while infinite)         |
| `grad_norm/clip_threshold`   | clipping threshold in force, every step clipping is on (with |
|                              | "auto" it changes every step; `clipnorm`: largest per-variable)|
| `grad_norm/explosion`        | 1.0 at each exploding step, and only there                   |
| `grad_norm/overflow`         | steps the loss-scale optimizer skipped (overflow) just before |
|                              | this step's update; only where there were some               |

Plugin data (plugin "gradwatch", string tensors holding JSON):

| tag                    | value                                                        |
| ---------------------- | ------------------------------------------------------------ |
| `gradwatch/layers`     | JSON list of layer paths in model order (written at start)   |
| `gradwatch/explosions` | JSON list of explosion records since the previous write      |
|                        | (with `culprits`, `culprits_summary`, `batch_size` and        |
|                        | `culprits_arrays` where the batch was kept and ranked:        |
|                        | `gradwatch.culprits.store`)                                   |
| `gradwatch/clipping`   | JSON list of clipping events (switch-on) since previous write|
| `gradwatch/vanishing`  | JSON list of vanishing / dead-gradient records since the     |
|                        | previous write: `step`, `epoch`, `kind` ("vanishing" or      |
|                        | "dead"), `layers` (`[[path, norm], ...]`), `detail`          |
| `gradwatch/norms`      | a block of consecutive steps (float32 tensor, rows x columns): |
|                        | the event's step is the block's first step, row i is step     |
|                        | first + i; column 0 the global norm, then one column per layer |
|                        | in `gradwatch/layers` order. The plugin reads every step from  |
|                        | these (TensorBoard keeps every gradwatch tensor, not a sample) |

Text (plugin "text", for the Text tab): `gradwatch/alerts`, one markdown line
per alert or burst summary.

Runs. A monitor watching one optimizer writes the run `<log_dir>/train` (the
run of Keras' `TensorBoard` callback). Watching several (a GAN's
`d_optimizer` and `g_optimizer`, `GradientMonitor(optimizers=...)`), each
optimizer that applies gradients writes its own run, `<log_dir>/train/<name>`
(`optimizer_run`), with the tags above and only the layers it updates; its
alert lines start `[<name>]`. So every reader (Scalars tab, the gradwatch
dashboard, `gradwatch report`) tells the optimizers apart by run.
"""

PREFIX = "grad_norm/"
GLOBAL = PREFIX + "global"
GLOBAL_CLIPPED = PREFIX + "global_clipped"
THRESHOLD = PREFIX + "threshold"
CLIP_THRESHOLD = PREFIX + "clip_threshold"
EXPLOSION = PREFIX + "explosion"
OVERFLOW = PREFIX + "overflow"

# Tags under PREFIX that are not layers. A layer named like one of these
# would collide; the monitor rejects such a model at start-up.
RESERVED = frozenset(
    {GLOBAL, GLOBAL_CLIPPED, THRESHOLD, CLIP_THRESHOLD, EXPLOSION, OVERFLOW}
)

PLUGIN_NAME = "gradwatch"
LAYERS = "gradwatch/layers"
EXPLOSIONS = "gradwatch/explosions"
CLIPPING = "gradwatch/clipping"
VANISHING = "gradwatch/vanishing"
NORMS = "gradwatch/norms"
ALERTS_TEXT = "gradwatch/alerts"

# Sub-folder of `log_dir` holding the training run (as Keras' TensorBoard).
TRAIN_RUN = "train"


def optimizer_run(name):
    """Run folder (under `log_dir`) of one of several watched optimizers: `train/<name>`."""
    return TRAIN_RUN + "/" + name

# `action` values of an explosion record.
ACTION_NONE = "none"
ACTION_CLIP_ON = "clipping_on"  # this explosion switched clipping on
ACTION_CLIPPED = "clipped"  # clipping already on; the step was clipped
ACTION_SKIPPED = "skipped"  # non-finite gradient: update skipped
ACTIONS = (ACTION_NONE, ACTION_CLIP_ON, ACTION_CLIPPED, ACTION_SKIPPED)


def layer_tag(layer_path):
    """Tag of a layer's norm series: `grad_norm/<layer path>`."""
    return PREFIX + layer_path


def layer_of_tag(tag):
    """The layer path of a per-layer tag, or None for other tags."""
    if not tag.startswith(PREFIX) or tag in RESERVED:
        return None
    return tag[len(PREFIX):]

# Clipping sweep (`gradwatch.sweep`). In each trial's folder (the HParams
# session), one value at step 0: the objective (best epoch), 1.0 if the trial
# diverged, and the explosions its monitor saw.
SWEEP_OBJECTIVE = "sweep/objective"
SWEEP_DIVERGED = "sweep/diverged"
SWEEP_EXPLOSIONS = "sweep/explosions"
# In the probe run (`<log_dir>/probe/train`) of thresholds="auto": per healthy
# step, the statistic each mode's thresholds derive from, and the thresholds
# chosen with why (text).
SWEEP_PROBE_STATISTICS = {
    "global_clipnorm": "sweep_probe/global_norm",
    "clipnorm": "sweep_probe/max_variable_norm",
    "clipvalue": "sweep_probe/max_abs_entry",
}
SWEEP_THRESHOLDS = "gradwatch/sweep_thresholds"

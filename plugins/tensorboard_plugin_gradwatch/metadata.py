"""Names the plugin shares with the writer; the tag strings live in `gradwatch.tags`."""

from gradwatch import tags

# Name of the plugin, of its routes (`/data/plugin/<name>/`) and of the
# `plugin_data.plugin_name` of the JSON string tensors the monitor writes.
PLUGIN_NAME = tags.PLUGIN_NAME

# TensorBoard's scalar plugin owns the `grad_norm/*` series.
SCALARS_PLUGIN_NAME = "scalars"

# Value of `--samples_per_plugin` meaning "keep every sample": the Python
# loader treats 0 as unlimited and `server_ingester` passes it to RustBoard
# (`--load_fast`) as "all".
KEEP_ALL_SAMPLES = 0

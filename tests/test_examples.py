"""Every example runs (briefly), so none of them rots."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, tmp_path, *args):
    module = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="example")
    module["main"](["--logdir", str(tmp_path / name), *args])
    return sorted((tmp_path / name).rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("name, args, expected", [
    ("textbook_mlp", ["--epochs", "1"], "plain SGD"),
    ("transformer", ["--epochs", "1"], "layers: tokens, attention, norm_1, ffn_in, ffn_out, norm_2, head"),
    ("mixed_precision", ["--epochs", "1"], "optimizer: LossScaleOptimizer"),
    ("mirrored_strategy", ["--epochs", "1"], "explosions: [(41, 'clipping_on')]"),
    # Two of the four runs: optimizer clipping (the plain run is its clip=None case) and gradwatch's
    # auto clipping (the run that writes event files).
    ("adding_problem", ["--epochs", "1", "--seeds", "2", "--runs", "clip from start", "gradwatch auto_clip=auto"],
     "gradwatch auto_clip=auto"),
    # One mode: 5 trials (no clipping + 4 thresholds) instead of 13, the same code paths.
    ("clipping_sweep", ["--epochs", "1", "--train-size", "512", "--modes", "global_clipnorm"],
     "x better than no clipping"),
    ("culprits", ["--epochs", "1"], "rows found: [57, 311, 480] (corrupted: [57, 311, 480])"),
])
def test_example_runs(name, args, expected, tmp_path, capsys):
    event_files = run_example(name, tmp_path, *args)
    assert event_files, f"{name} wrote no event file"
    assert expected in capsys.readouterr().out

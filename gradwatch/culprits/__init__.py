"""Which samples made the gradient explode (issue 25).

- `keep`: the exploding step's batch and pre-update weights kept on the device,
  inside the compiled step, at no cost on healthy steps (`BatchKeeper`);
- `per_sample`: each sample's loss and gradient norm, on the host;
- `ranking`: `Culprit`, the ranking and the share rule (pure functions);
- `find`: `find_culprits`, the culprit samples' indices in the user's own data;
- `store`: what is written in the run folder.

Imports point down: `ranking` imports nothing of gradwatch; `gradwatch.alerts`
imports `ranking`; the recorder uses the rest.
"""

from gradwatch.culprits.ranking import BatchNotKeptError, Culprit, describe, dominant, rank

__all__ = ["Culprit", "BatchNotKeptError", "rank", "dominant", "describe", "find_culprits"]


def __getattr__(name):
    if name == "find_culprits":
        from gradwatch.culprits.find import find_culprits

        return find_culprits
    raise AttributeError(f"module 'gradwatch.culprits' has no attribute {name!r}")

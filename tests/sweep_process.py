"""One process of the distributed clipping-sweep test (`test_sweep_distributed`).

Usage: python sweep_process.py LOG_DIR. KerasTuner's environment variables
(`KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`) say
whether this is the chief or a worker. The chief prints the results as JSON.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

import gradwatch  # noqa: E402
from test_sweep import Builder, corrupted_regression  # noqa: E402

DISTRIBUTED_FIT = dict(epochs=2, batch_size=32, verbose=0)


def main(log_dir):
    x, y, val = corrupted_regression()
    sweep = gradwatch.ClippingSweep(Builder(), log_dir=log_dir, modes=("global_clipnorm",),
                                    verbose=0)
    results = sweep.search(x, y, validation_data=val, **DISTRIBUTED_FIT)
    if results is not None:
        print(json.dumps(results.to_json()))


if __name__ == "__main__":
    main(sys.argv[1])

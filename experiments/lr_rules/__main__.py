"""`python -m experiments.lr_rules --output_dir=DIR [--smoke]`: the flags and the run.

The experiment itself is the package (`__init__.py`), importable without defining flags.
"""

import os

from absl import flags

from experiments import lr_rules as experiment
from trainer import cli

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results and run workdirs go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir; None = TFDS's default.")
_SMOKE = flags.DEFINE_bool("smoke", False, "One set-up, two LRs, a few steps: the plumbing.")


def main(argv: list[str]) -> None:
    del argv
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    short = {}
    if _SMOKE.value:
        short = {
            "trial_steps": 150,  # The warmup (50) and one health.trend_window (100).
            "range_test": {"min_lr": 1e-3, "max_lr": 10.0, "num_steps": 30},
            "grid": (0.05, 0.2),
        }
    experiment.run_experiment(
        _OUTPUT_DIR.value,
        setups=experiment.SETUPS[:1] if _SMOKE.value else experiment.SETUPS,
        data_dir=_DATA_DIR.value,
        **short,
    )
    with open(os.path.join(_OUTPUT_DIR.value, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    cli.run(main, "output_dir")

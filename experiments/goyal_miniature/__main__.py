"""`python -m experiments.goyal_miniature --output_dir=DIR [--smoke]`: the flags and the run.

The experiment itself is the package (`__init__.py`), importable without defining flags.
"""

import os

from absl import flags

from experiments import goyal_miniature as experiment
from trainer import cli

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results and run workdirs go.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir; None = TFDS's default.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Runs per arm, seeds 0..N-1 (--smoke: 1).")
_EPOCHS = flags.DEFINE_float("epochs", 18.0, "Epochs of every arm (--smoke: a few steps).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Two arms, one seed, a few steps: checks the plumbing.")


def main(argv: list[str]) -> None:
    del argv
    smoke = _SMOKE.value
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    experiment.run_experiment(
        _OUTPUT_DIR.value,
        arms=experiment.SMOKE_ARMS if smoke else experiment.ARMS,
        seeds=1 if smoke else _SEEDS.value,
        epochs=experiment.SMOKE_EPOCHS if smoke else _EPOCHS.value,
        data_dir=_DATA_DIR.value,
    )
    with open(os.path.join(_OUTPUT_DIR.value, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    cli.run(main, "output_dir")

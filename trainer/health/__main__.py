"""Renders the health report of a run, finished or still training.

  python -m trainer.health --workdir=/tmp/tfscale [--plot=health.png]

Writes WORKDIR/health.json and the PNG (loss and applied LR per update, the plan dashed, health
events marked) and prints the verdict and every event.
"""

from absl import flags

from trainer import cli
from trainer.health import report

_PLOT = flags.DEFINE_string("plot", None, "Where to write the PNG; default WORKDIR/health.png.")


def main(argv: list[str]) -> None:
    del argv
    report.write(cli.WORKDIR.value, _PLOT.value)


if __name__ == "__main__":
    cli.run(main, "workdir")

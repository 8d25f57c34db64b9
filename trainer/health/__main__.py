"""Renders the health report of a run, finished or still training.

  python -m trainer.health --workdir=/tmp/tfscale [--png=health.png]

Writes WORKDIR/health.json and the PNG (loss and applied LR per update, the plan dashed, health
events marked) and prints the verdict and every event.
"""

from absl import flags

from trainer import cli
from trainer.health import report

_PNG = flags.DEFINE_string("png", None, "Where to write the PNG; default WORKDIR/health.png.")


def main(argv: list[str]) -> None:
    del argv
    report.write(cli.WORKDIR.value, _PNG.value)


if __name__ == "__main__":
    cli.run(main, "workdir")

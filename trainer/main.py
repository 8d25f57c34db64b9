"""Command-line entry point: parses flags and hands a config and a workdir to `trainer.train`.

  python -m trainer.main --config=configs/default.py --workdir=/tmp/tfscale [--config.lr.base=0.1]

Kept short on purpose: the logic lives in importable, tested modules. Exit codes: 0 done,
42 preempted (checkpoint written; rerun the same command to resume), 1 error (one line for a
user error, a traceback for anything else).
"""

import sys

import tensorflow as tf
from absl import logging

from trainer import cli, preemption, train


def main(argv: list[str]) -> None:
    del argv
    tf.get_logger().setLevel("WARNING")  # TF's per-trace INFO lines would bury the progress.
    try:
        train.train_and_evaluate(cli.CONFIG.value, cli.WORKDIR.value)
    except preemption.Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(preemption.EXIT_CODE_PREEMPTED)


if __name__ == "__main__":
    cli.run(main, "config", "workdir")

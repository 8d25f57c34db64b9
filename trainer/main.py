"""Command-line entry point: parses flags and hands a config and a workdir to `trainer.train`.

  python -m trainer.main --config=configs/default.py --workdir=/tmp/tfscale [--config.lr.base=0.1]

Kept short on purpose: the logic lives in importable, tested modules. Exit codes: 0 done,
42 preempted (checkpoint written; rerun the same command to resume), 43 lost another worker of a
multi-worker job (relaunch all workers; see lost_worker.py), 1 error (one line for a user error,
a traceback for anything else).
"""

import sys

from trainer import cli, preemption

if __name__ == "__main__":  # Before the heavy imports: a signal during them still ends in 42.
    preemption.install_for_process()
    # TensorFlow's start-up chatter hidden unless --tf_log_level asks for it (cli.py).
    cli.start_tensorflow(sys.argv)

from absl import logging  # noqa: E402

from trainer import lost_worker, train  # noqa: E402


def main(argv: list[str]) -> None:
    del argv
    try:
        train.train_and_evaluate(cli.CONFIG.value, cli.WORKDIR.value)
    except preemption.Preempted as stop:
        logging.warning("%s", stop)
        preemption.ignore_while_exiting()
        sys.exit(preemption.EXIT_CODE_PREEMPTED)
    except lost_worker.LostWorker as lost:
        logging.debug("details", exc_info=True)
        logging.error("error: %s", lost)
        sys.exit(lost_worker.EXIT_CODE_LOST_WORKER)


if __name__ == "__main__":
    cli.run(main, "config", "workdir")

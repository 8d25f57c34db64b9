"""Command-line entry point: parses flags and hands a config and a workdir to `trainer.train`.

  python -m trainer.main --config=configs/default.py --workdir=/tmp/tfscale [--config.lr.base=0.1]

Kept short on purpose: the logic lives in importable, tested modules. Exit codes: 0 done,
42 preempted (checkpoint written; rerun the same command to resume), 1 error.
"""

import sys

import tensorflow as tf
from absl import app, flags, logging
from ml_collections import config_flags

from trainer import checkpointing, distribute, preemption, train, workdir_lock

# Errors whose message already says what is wrong and how to fix it: shown as one line.
_USER_ERRORS = (
    ValueError,
    OSError,
    checkpointing.CheckpointError,
    train.NonFiniteLossError,
    distribute.StrategyError,
    workdir_lock.LockError,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "A config file with get_config(); override fields with --config.FIELD=VALUE.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a misspelled `--config.FIELD` turned into one actionable line.

    ml_collections raises a bare AttributeError/KeyError naming only the missing key.
    """
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        while error.args and isinstance(error.args[0], Exception):  # Unwrap KeyError in Attr...
            error = error.args[0]
        detail = str(error.args[0] if error.args else error).replace("\n", "; ")
        sys.exit(
            f"error: no such config field {detail} (in {', '.join(overrides)}); every field is "
            "defined, with a comment, in configs/default.py"
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().setFormatter(None)  # Plain lines; absl adds no prefix noise.
    tf.get_logger().setLevel("WARNING")  # TF's per-trace INFO lines would bury the progress.
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted as stop:
        logging.warning("%s", stop)
        sys.exit(preemption.EXIT_CODE_PREEMPTED)
    except _USER_ERRORS as error:
        logging.debug("details", exc_info=True)
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)

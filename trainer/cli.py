"""What every command-line tool shares: the `--config`/`--workdir` flags and how errors end.

Defined once here, so the tools (`trainer.main`, `trainer.plan`, `trainer.lr_find`) can all be
imported, and tested, in one process. A `UserError` (or a bad `--config` flag) ends the tool
with one line naming the value and the fix, exit code 1; anything else is a bug and keeps its
traceback.
"""

import sys
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from trainer.errors import UserError

CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "A config file with get_config(); override fields with --config.FIELD=VALUE.",
    lock_config=True,
)
WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")


def _config_flag_error(argv: list[str], error: Exception) -> str:
    """One line for a failed `--config` / `--config.FIELD=VALUE`; ml_collections' own errors name
    only a key, or wrap the config file's exception in several layers."""
    while error.args and isinstance(error.args[0], Exception):  # Unwrap KeyError in Attr...
        error = error.args[0]
    detail = str(error.args[0] if error.args else error).replace("\n", "; ")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    if isinstance(error, (AttributeError, KeyError)):
        return (
            f"error: no such config field {detail} (in {', '.join(overrides)}); every field is "
            "defined, with a comment, in configs/default.py"
        )
    return f"error: {detail}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with every config-flag mistake turned into one actionable line.

    Covers: a misspelled field, a value of the wrong type (`--config.lr.base=abc`), a missing
    config file, and a config file that fails to import (syntax error).
    """
    try:
        return flags.FLAGS(argv)
    except flags.IllegalFlagValueError as error:
        sys.exit(f"error: {str(error).splitlines()[0]}")
    except flags.Error as error:
        sys.exit(f"error: {error}; see --help")
    except (AttributeError, KeyError) as error:
        sys.exit(_config_flag_error(argv, error))
    except (OSError, SyntaxError, ImportError) as error:  # The config file itself.
        config = next((a for a in argv if a.startswith("--config=")), "--config")
        sys.exit(
            f"error: cannot load {config} ({type(error).__name__}: {error}); pass a Python file "
            "with get_config(), e.g. --config=configs/default.py"
        )


def run(main: Callable[[list[str]], None], *required: str) -> None:
    """Runs `main` as a command-line tool; `required` names the flags it cannot do without."""
    flags.mark_flags_as_required(list(required))

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.get_absl_handler().setFormatter(None)  # Plain lines; absl adds no prefix noise.
        try:
            main(argv)
        except UserError as error:
            logging.debug("details", exc_info=True)
            sys.exit(f"error: {error}")

    app.run(guarded, flags_parser=parse_flags)

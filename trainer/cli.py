"""What every command-line tool shares: the `--config`/`--workdir` flags and how errors end.

Defined once here, so the tools (`trainer.main`, `trainer.plan`, `trainer.lr_find`) can all be
imported, and tested, in one process. A `UserError` (or a bad `--config` / `--workdir` flag) ends
the tool with one line naming the value and the fix, exit code 1; anything else is a bug and
keeps its traceback.
"""

import functools
import os
import re
import sys
import traceback
from collections.abc import Callable

import ml_collections
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
# An empty --workdir= (e.g. from an unset shell variable) would put the run's files in the
# current directory; refused while the flags are parsed, before anything runs.
flags.register_validator(
    "workdir",
    lambda workdir: workdir is None or bool(workdir.strip()),
    message="empty, which would put the run in the current directory; pass a directory, "
    "e.g. --workdir=/tmp/tfscale",
)

_LOAD_FIX = "pass a Python file with get_config(), e.g. --config=configs/default.py"


def _exit(message: str) -> None:
    """Ends the tool with `error: message` on one line, whatever newlines the message holds."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    sys.exit(f"error: {'; '.join(lines)}")


def _config_path(argv: list[str]) -> str | None:
    """The config file named by `--config=PATH[:ARG]` or `--config PATH`, None if not given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _same_file(a: str, b: str | None) -> bool:
    return b is not None and os.path.abspath(a) == os.path.abspath(b)


def _file_problem(path: str, error: Exception) -> str:
    """Why ml_collections could not read `path`; its own message spans five lines."""
    if not path:
        return "the path is empty"
    if os.path.isdir(path):
        return "it is a directory"
    if not os.path.exists(path):
        return f"no such file (relative paths start at {os.getcwd()})"
    return str(error).strip().splitlines()[-1].strip()


def _cannot_load(path: str | None, problem: str) -> str:
    return f"cannot load --config={path}: {problem}; {_LOAD_FIX}"


def _override_error(argv: list[str], error: Exception) -> str:
    """One line for a `--config.FIELD` that does not exist; ml_collections' own errors name
    only a key, or wrap it in several layers."""
    while error.args and isinstance(error.args[0], Exception):  # Unwrap KeyError in Attr...
        error = error.args[0]
    detail = str(error.args[0] if error.args else error)
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    return (
        f"no such config field {detail} (in {', '.join(overrides)}); every field is defined, "
        "with a comment, in configs/default.py"
    )


def _load_error(argv: list[str], error: Exception) -> str | None:
    """One line for an exception raised while the config was loaded and overridden, or None
    when it is none of the user's doing (then it keeps its traceback)."""
    path = _config_path(argv)
    if isinstance(error, SyntaxError):
        return _cannot_load(path, f"SyntaxError at line {error.lineno}: {error.msg}")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if _same_file(f.filename, path)]
    if frames:  # Raised by the config file's own code (an import, a NameError, ...).
        return _cannot_load(path, f"line {frames[-1].lineno}: {type(error).__name__}: {error}")
    if isinstance(error, OSError):  # Deferred by ml_collections, raised by an override.
        return _cannot_load(path, _file_problem(path, error))
    if isinstance(error, (AttributeError, KeyError)):
        return _override_error(argv, error)
    return None


def _illegal_value_error(argv: list[str], error: flags.IllegalFlagValueError) -> str:
    """One line for a flag value that does not parse, with the field's type and current value
    when it is a config override: `--config.lr.base=abc` -> lr.base is of type float, e.g. 0.2."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Error whilst parsing config file" in text:  # get_config() raised TypeError/ValueError.
        path = _config_path(argv)
        numbers = [
            n for f, n in re.findall(r'File "([^"]+)", line (\d+)', text) if _same_file(f, path)
        ]
        where = f"line {numbers[-1]}: " if numbers else ""
        return _cannot_load(path, f"{where}{lines[-1]}")
    message = lines[0]
    field = re.match(r"flag --config\.([\w.]+)=", message)
    if field:
        try:
            value = functools.reduce(getattr, field[1].split("."), CONFIG.value)
        except Exception:  # Only a hint: the message stands without it.
            value = None
        if value is not None:
            message += (
                f"; {field[1]} is of type {type(value).__name__}, e.g. "
                f"--config.{field[1]}={value!r}"
            )
    return message


def _check_config_loaded(argv: list[str]) -> None:
    """ml_collections defers a config file it cannot read (missing, a directory) until the
    config is first used, mid-run and as a traceback; this reads it now."""
    path, config = _config_path(argv), CONFIG.value
    if path is None or isinstance(config, ml_collections.ConfigDict):
        return
    try:
        getattr(config, "keys", None)  # The deferred error of an unreadable file raises here.
    except OSError as error:
        _exit(_cannot_load(path, _file_problem(path, error)))
    _exit(
        f"get_config() in --config={path} returned {config!r}, not a ConfigDict; end it with "
        "`return config`"
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with every config-flag mistake turned into one actionable line.

    Covers: a misspelled field, a value of the wrong type (`--config.lr.base=abc`), a missing
    config file, a config file that fails to import or run (syntax error, NameError, ...) and
    an empty `--workdir=`.
    """
    try:
        remaining = flags.FLAGS(argv)
    except flags.IllegalFlagValueError as error:
        _exit(_illegal_value_error(argv, error))
    except flags.Error as error:
        _exit(f"{error}; see --help")
    except Exception as error:  # Raised while loading the config file or applying overrides.
        message = _load_error(argv, error)
        if message is None:
            raise
        _exit(message)
    _check_config_loaded(argv)
    return remaining


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

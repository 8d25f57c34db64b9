"""What every command-line tool shares: the `--config`/`--workdir` flags and how errors end.

Defined once here, so the tools (`trainer.main`, `trainer.plan`, `trainer.lr_find`) can all be
imported, and tested, in one process. A `UserError` (or a bad `--config` / `--workdir` flag) ends
the tool with one line naming the value and the fix, exit code 1; anything else is a bug and
keeps its traceback.

The console is quiet by default: `start_tensorflow` imports TensorFlow with its C++ log level set
and its start-up chatter (oneDNN, the CUDA probe, absl's pre-init warning) hidden, and `run` drops
the INFO lines of TensorFlow, TFDS and Keras; `--tf_log_level` brings them back.
"""

import contextlib
import functools
import importlib.util
import logging as python_logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator

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

TF_LOG_LEVEL = flags.DEFINE_integer(
    "tf_log_level",
    None,
    "What TensorFlow, TFDS and Keras may print besides warnings and errors from Python: 0 = "
    "everything (start-up probes, INFO lines), 1 = C++ warnings and errors, 2 = C++ errors, "
    "3 = none of their C++ lines. TF_CPP_MIN_LOG_LEVEL, which it sets. Default: "
    "$TF_CPP_MIN_LOG_LEVEL, else 2.",
    lower_bound=0,
    upper_bound=3,
)
DEFAULT_TF_LOG_LEVEL = 2

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


# Lines TF writes to stderr while it starts, before its log level applies (absl's pre-init
# logging ignores TF_CPP_MIN_LOG_LEVEL), that say nothing about the run. Hidden unless
# --tf_log_level=0; any other line printed meanwhile is shown.
_START_UP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine"
    r"|cpu_feature_guard\.cc|^To enable the following instructions: "
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|TF-TRT Warning: Could not find TensorRT"
)
# Said (as an error) by the CUDA probe of a machine with no NVIDIA driver: noise only there.
_NO_DRIVER = "Could not find cuda drivers on your machine"
_CU_INIT_FAILED = "failed call to cuInit"


def tf_log_level(argv: list[str]) -> int:
    """`--tf_log_level` from `argv`, read before the flags are parsed (it must be in the
    environment before TensorFlow is imported); else $TF_CPP_MIN_LOG_LEVEL; else 2. A value
    that is not a number counts as the default here; the flag parser then rejects it."""
    for i, arg in enumerate(argv):
        if arg.startswith("--tf_log_level="):
            value = arg.split("=", 1)[1]
        elif arg == "--tf_log_level" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        return int(value) if value.strip().isdigit() else DEFAULT_TF_LOG_LEVEL
    environment = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip()
    return int(environment) if environment.isdigit() else DEFAULT_TF_LOG_LEVEL


def without_start_up_noise(text: str) -> str:
    """`text` without TF's start-up chatter (the cuInit error only if no driver was found)."""
    no_driver = _NO_DRIVER in text
    kept = [
        line
        for line in text.splitlines(keepends=True)
        if not _START_UP_NOISE.search(line) and not (no_driver and _CU_INIT_FAILED in line)
    ]
    return "".join(kept)


@contextlib.contextmanager
def _stderr_without_start_up_noise() -> Iterator[None]:
    """Captures file descriptor 2 (where TF's C++ logs go) and replays it without the noise.

    If the block raises, everything captured is replayed as it was: it may explain the error.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            sys.stderr.write(text if failed else without_start_up_noise(text))
            sys.stderr.flush()


def start_tensorflow(argv: list[str]) -> None:
    """Imports TensorFlow quietly, as `--tf_log_level` says; call it before anything else does.

    Sets TF_CPP_MIN_LOG_LEVEL, then imports TF and lists the physical devices (the CUDA probe)
    with their start-up chatter hidden. Listing *physical* devices starts no runtime, so logical
    CPUs and collectives can still be configured afterwards.
    """
    level = tf_log_level(argv)
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = str(level)
    if level == 0 or "tensorflow" in sys.modules:
        return
    with _stderr_without_start_up_noise():
        import tensorflow as tf

        tf.config.list_physical_devices()


def _package_directories(*names: str) -> tuple[str, ...]:
    """Where these packages are installed, found without importing them."""
    directories = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            directories += [os.path.join(d, "") for d in spec.submodule_search_locations]
    return tuple(directories)


class _LibraryInfoFilter(python_logging.Filter):
    """Drops INFO (and DEBUG) records logged from inside TensorFlow, TFDS and Keras ("Load
    dataset info from ...", "Sharding callback duration: ..."); their warnings and errors pass,
    and so does everything the trainer logs."""

    def __init__(self):
        super().__init__()
        self._directories = _package_directories("tensorflow", "tensorflow_datasets", "keras")

    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= python_logging.WARNING or not record.pathname.startswith(
            self._directories
        )


def run(main: Callable[[list[str]], None], *required: str) -> None:
    """Runs `main` as a command-line tool; `required` names the flags it cannot do without."""
    flags.mark_flags_as_required(list(required))

    def guarded(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        handler = logging.get_absl_handler()
        handler.setFormatter(None)  # Plain lines; absl adds no prefix noise.
        level = TF_LOG_LEVEL.value
        if (level if level is not None else tf_log_level([])) > 0:
            handler.addFilter(_LibraryInfoFilter())
            # TF's Python logger may have its own handler (when imported before absl's): per-trace
            # and "Assets written to" INFO lines would bury the progress.
            python_logging.getLogger("tensorflow").setLevel(python_logging.WARNING)
        try:
            main(argv)
        except UserError as error:
            logging.debug("details", exc_info=True)
            sys.exit(f"error: {error}")

    app.run(guarded, flags_parser=parse_flags)

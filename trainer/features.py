"""The opt-in features of trainer/extras/: which config fields ask for each, and loading them.

The core imports an extra only through `load`, so a copy of the repository without
trainer/extras/ trains every config that asks for none of them, and one that asks for a missing
feature fails at start-up with one line that names the feature and the field.
"""

import importlib
from types import ModuleType

import ml_collections

from trainer.errors import ConfigError

# Feature (module under trainer/extras/) -> (the fields that ask for it, "is it asked for?").
ASKED_BY = {
    "best": ("best_metric", lambda config: bool(config.best_metric)),
    "ema": ("ema_decay", lambda config: config.ema_decay > 0),
    "init_checkpoint": ("init_checkpoint", lambda config: bool(config.init_checkpoint)),
    "lr_control": (
        "lr.milestones / lr.plateau_metric",
        lambda config: bool(config.lr.milestones) or bool(config.lr.plateau_metric),
    ),
    "profiling": ("profile_steps", lambda config: bool(config.profile_steps)),
}


def asked(name: str, config: ml_collections.ConfigDict) -> bool:
    return ASKED_BY[name][1](config)


def load(name: str, config: ml_collections.ConfigDict | None = None) -> ModuleType | None:
    """`trainer.extras.NAME`, or None if it is not there.

    Raises:
      ConfigError: it is not there although `config` asks for it.
    """
    try:
        return importlib.import_module(f"trainer.extras.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("trainer.extras", f"trainer.extras.{name}"):
            raise  # Something the extra imports is missing: a broken install, not a choice.
        if config is not None and asked(name, config):
            fields = ASKED_BY[name][0]
            raise ConfigError(
                f"{fields} asks for the {name} feature, but trainer/extras/{name}.py is not in "
                f"this copy of tfscale; restore it, or unset {fields}"
            ) from error
        return None


def if_asked(name: str, config: ml_collections.ConfigDict) -> ModuleType | None:
    """The extra's module when `config` asks for it (see `load`), else None."""
    return load(name, config) if asked(name, config) else None


def require(name: str, why: str) -> ModuleType:
    """`trainer.extras.NAME` where something on disk needs it, e.g. a checkpoint with an EMA.

    Raises:
      ConfigError: it is not in this copy; `why` says what needs it.
    """
    module = load(name)
    if module is None:
        raise ConfigError(
            f"{why} needs trainer/extras/{name}.py, which is not in this copy of tfscale; "
            "restore it"
        )
    return module

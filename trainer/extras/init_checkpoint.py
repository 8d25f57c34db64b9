"""Fine-tuning: model weights for a fresh run from another run's checkpoint or a Keras file.

`init_checkpoint` names the source: a tfscale workdir (its newest complete checkpoint), a
checkpoint prefix `.../ckpt-STEP` (e.g. WORKDIR/export/best/checkpoint/ckpt-STEP), a `.keras`
file or a `.weights.h5` file. Only a fresh run reads it (`Run.restore_or_initialize`, before
ckpt-0): optimizer slots, step and LR state start fresh, and a resumed run restores its own
checkpoints, never this source again.

Layers are matched by the names Keras itself gives them in `.keras` / `.weights.h5` files: the
layer's class in snake case, numbered in the model's layer order (`conv2d`, `conv2d_1`, ...,
`dense`, `dense_1`), so they do not depend on what else the process built. The classifier is
the last `dense_N`. `init_checkpoint_include` / `_exclude` are fnmatch patterns over these
names (e.g. `("dense_1",)` to start a new head fresh). A matched layer whose shapes differ is an
error naming it, never a silent skip.
"""

import dataclasses
import fnmatch
import zipfile

import h5py
import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

# Keras's own naming of layers in weight files; its private module, so names always agree with
# the files the installed Keras writes.
from keras.src.utils import naming

from trainer import checkpointing, export
from trainer.errors import ConfigError

KERAS_WEIGHTS_IN_ARCHIVE = "model.weights.h5"  # Where a .keras zip keeps the weights.


@dataclasses.dataclass(frozen=True)
class Report:
    """What a fine-tuning load did, by layer name (layers that hold weights only)."""

    source: str
    loaded: list[str]  # This model's layers whose weights came from the source.
    initialized: list[str]  # This model's layers left as freshly initialized.
    skipped: list[str]  # The source's layers not used (excluded, or not in this model).

    def summary(self) -> str:
        def names(layers: list[str]) -> str:
            return f"{len(layers)} ({', '.join(layers)})" if layers else "0"

        return (
            f"init_checkpoint | from: {self.source} | loaded: {names(self.loaded)} | newly "
            f"initialized: {names(self.initialized)} | skipped from the source: "
            f"{names(self.skipped)}"
        )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates the form of the init_checkpoint fields at start-up; whether the source exists
    is checked only by a fresh run (a resumed run never reads it, and it may be gone by then).

    Raises:
      ConfigError: naming the field and the fix.
    """
    for field in ("init_checkpoint_include", "init_checkpoint_exclude"):
        patterns = config[field]
        if not isinstance(patterns, (tuple, list)) or not all(
            isinstance(p, str) and p for p in patterns
        ):
            raise ConfigError(
                f"{field} ({patterns!r}) must be a tuple of layer-name patterns, e.g. "
                f"--config.{field}='(\"dense_1\",)'"
            )
    if (config.init_checkpoint_include or config.init_checkpoint_exclude) and not (
        config.init_checkpoint
    ):
        raise ConfigError(
            "init_checkpoint_include/init_checkpoint_exclude are set but init_checkpoint is ''; "
            "name the checkpoint or file to load from"
        )


def layer_names(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """This model's layers by the names Keras uses in its weight files (see the module doc).

    Layers of a nested model are named `outer/inner`. Only layers holding weights are listed.
    """
    named = {}
    counts: dict[str, int] = {}
    for layer in model.layers:
        base = naming.to_snake_case(type(layer).__name__)
        name = base if base not in counts else f"{base}_{counts[base] + 1}"
        counts[base] = counts.get(base, -1) + 1
        if isinstance(layer, keras.Model):
            named.update({f"{name}/{k}": v for k, v in layer_names(layer).items()})
        elif layer.weights:
            named[name] = layer
    return named


def _h5_weights(group: h5py.Group, prefix: str = "") -> dict[str, list[np.ndarray]]:
    """Layer name -> weights, from the `layers/` group of a Keras 3 weights file."""
    weights = {}
    for name in group:
        layer = group[name]
        variables = layer.get("vars")
        if variables is not None and len(variables):
            weights[prefix + name] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
        if "layers" in layer:  # A nested model.
            weights.update(_h5_weights(layer["layers"], f"{prefix}{name}/"))
    return weights


def _read_weights_file(path: str) -> dict[str, list[np.ndarray]]:
    with tf.io.gfile.GFile(path, "rb") as f:
        if path.endswith(".keras"):
            with zipfile.ZipFile(f) as archive, archive.open(KERAS_WEIGHTS_IN_ARCHIVE) as h5:
                with h5py.File(h5, "r") as weights:
                    return _h5_weights(weights["layers"])
        with h5py.File(f, "r") as weights:
            return _h5_weights(weights["layers"])


def read_source(path: str) -> tuple[str, dict[str, list[np.ndarray]]]:
    """The source's weights by layer name, and what it resolved to (e.g. the checkpoint prefix).

    Raises:
      ConfigError: `path` is none of the accepted kinds or cannot be read.
    """
    if path.endswith((".keras", ".h5")):
        if not tf.io.gfile.exists(path):
            raise ConfigError(f"init_checkpoint ({path}): no such file")
        try:
            return path, _read_weights_file(path)
        except (OSError, KeyError, zipfile.BadZipFile, tf.errors.OpError) as error:
            reason = (getattr(error, "message", None) or str(error)).strip().splitlines()
            raise ConfigError(
                f"init_checkpoint ({path}) is not a Keras 3 weights file "
                f"({reason[0] if reason else type(error).__name__}); save one with "
                "model.save('x.keras') or model.save_weights('x.weights.h5')"
            ) from error
    try:
        prefix, manifest = checkpointing.find_checkpoint(path)
    except checkpointing.CheckpointError as error:
        raise ConfigError(
            f"init_checkpoint ({path}): {error}; or give a .keras or .weights.h5 file"
        ) from error
    model = export.load_model(prefix, manifest)
    return prefix, {name: layer.get_weights() for name, layer in layer_names(model).items()}


def _matching(names: list[str], patterns: tuple[str, ...], field: str) -> set[str]:
    """The names any pattern matches; a pattern matching nothing is a mistake, named."""
    matched = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ConfigError(
                f"{field} pattern {pattern!r} matches no layer of this model or the checkpoint; "
                f"layers: {', '.join(names)}"
            )
        matched.update(hits)
    return matched


def _shape_mismatch(name: str, here: list, there: list[np.ndarray]) -> str | None:
    """How a layer's weights here and in the source differ, or None if they fit."""
    if len(here) != len(there):
        return f"{name} has {len(here)} weights here but {len(there)} in the source"
    for variable, value in zip(here, there, strict=True):
        if tuple(variable.shape) != value.shape:
            weight = variable.path.rsplit("/", 1)[-1]
            return (
                f"{name}/{weight} is {list(variable.shape)} here but {list(value.shape)} in the "
                "source"
            )
    return None


def load(model: keras.Model, config: ml_collections.ConfigDict) -> Report:
    """Loads `config.init_checkpoint`'s weights into `model` (call for a fresh run only).

    Works on a model built under any strategy (variables are assigned in cross-replica context).

    Raises:
      ConfigError: an unreadable source, a pattern matching no layer, a matched layer whose
        shapes differ (named, with the exclude that fixes it), or nothing to load at all.
    """
    check_config(config)
    resolved, source = read_source(config.init_checkpoint)
    target = layer_names(model)
    names = sorted(target.keys() | source.keys())
    selected = set(target)
    if config.init_checkpoint_include:
        selected = _matching(
            names, tuple(config.init_checkpoint_include), "init_checkpoint_include"
        )
    selected -= _matching(names, tuple(config.init_checkpoint_exclude), "init_checkpoint_exclude")
    to_load = [name for name in target if name in selected and name in source]
    mismatches = {
        name: problem
        for name in to_load
        if (problem := _shape_mismatch(name, target[name].weights, source[name]))
    }
    if mismatches:
        problems = list(mismatches.values())
        excluded = ", ".join(f'"{name}"' for name in [*config.init_checkpoint_exclude, *mismatches])
        raise ConfigError(
            f"init_checkpoint ({resolved}) does not fit this model: {'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''}; to start those layers fresh pass "
            f"--config.init_checkpoint_exclude='({excluded},)'"
        )
    if not to_load:
        raise ConfigError(
            f"init_checkpoint ({resolved}) shares no layer with this model (its layers: "
            f"{', '.join(source) or 'none'}; this model's: {', '.join(target)}); check "
            "init_checkpoint_include/init_checkpoint_exclude"
        )
    for name in to_load:
        for variable, value in zip(target[name].weights, source[name], strict=True):
            variable.assign(value)
    report = Report(
        source=resolved,
        loaded=to_load,
        initialized=[name for name in target if name not in to_load],
        skipped=[name for name in source if name not in to_load],
    )
    logging.info("%s", report.summary())
    return report

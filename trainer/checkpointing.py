"""What a checkpoint holds, how it is written, and the order in which a run is restored.

Layout: WORKDIR/checkpoints/ckpt-STEP.{index,data-*} written by `tf.train.Checkpoint.write`, then
ckpt-STEP.manifest.json written atomically *after* it. The manifest is the commit marker: a save
killed half-way has no manifest and is never restored, so a partial save never becomes "latest".

TF's `checkpoint` state file is written too, after the manifest and naming only complete
checkpoints, so other tools find them (`tf.train.latest_checkpoint(WORKDIR/checkpoints)`,
`tf.train.CheckpointManager`, TensorBoard). tfscale itself never reads it: an unreadable one
makes `latest_checkpoint` return None, and restoring None silently restores nothing.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable

import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError, UserError

_CKPT = re.compile(r"ckpt-(\d+)\.index$")
STATE_FILE = "checkpoint"  # TF's name (CheckpointManager, tf.train.latest_checkpoint).


class CheckpointError(UserError):
    """A workdir's checkpoints cannot be used; the message says what to do."""


# Config fields that decide which variables a checkpoint holds: resuming with a value that needs
# variables the checkpoint lacks cannot restore it. (field, whether the new value needs more
# than the saved one did (saved, new, the new config flattened), what it adds). Changes the other
# way round restore (what is no longer needed is left unread) and are only logged.
_STATE_SHAPING: tuple[tuple[str, Callable[[object, object, dict], bool], str], ...] = (
    ("precision", lambda old, new, _: old != new == "mixed_float16", "a dynamic loss scale"),
    (
        "optimizer.momentum",
        lambda old, new, c: old == 0 != new and c["optimizer.name"] in ("sgd", "lars"),
        "a velocity per weight",
    ),
    (
        "optimizer.momentum_correction",
        lambda old, new, _: new and not old,
        "a previous learning rate per weight",
    ),
    ("ema_decay", lambda old, new, _: old == 0 != new, "an EMA of the weights"),
    ("model.dropout_rate", lambda old, new, _: old == 0 != new, "a dropout RNG state"),
    ("health.window", lambda old, new, _: old != new, "spike statistics of that length"),
)


def flatten_config(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested config dict as {"optimizer.momentum": 0.9, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a checkpoint was written for; compared on resume before anything is restored."""

    step: int
    examples_seen: int
    model: str  # Model name.
    model_variables: list[list]  # Shape of every model weight, in order.
    optimizer: str
    plan: dict
    config: dict
    versions: dict
    # What the model was built for, so tools (export, fine-tuning) rebuild it without the data;
    # None in manifests written before these were recorded (then read from the dataset's info).
    input_shape: list[int] | None = None
    num_classes: int | None = None
    # Whether it holds an EMA of the weights (ema_decay > 0; trainer/extras/ema.py) under "ema".
    weight_ema: bool = False

    def incompatibility(self, other: "Manifest") -> str | None:
        """Says what differs in a way that cannot be restored, or None."""
        if (self.model, self.model_variables) != (other.model, other.model_variables):
            differing = [
                f"{a} vs {b}"
                for a, b in zip(self.model_variables, other.model_variables, strict=False)
                if a != b
            ][:3]
            return (
                f"model '{self.model}' ({len(self.model_variables)} variables) vs this run's "
                f"'{other.model}' ({len(other.model_variables)} variables); first differences: "
                f"{differing or 'variable count'}"
            )
        if self.optimizer != other.optimizer:
            return f"optimizer '{self.optimizer}' vs this run's '{other.optimizer}'"
        return None

    def state_change(self, other: "Manifest") -> tuple[str, object, object, str] | None:
        """(field, its value here, its value in `other` (this run's), what the new value adds)
        of the first config field whose value in `other` needs variables this checkpoint does
        not hold, or None. A field missing from either config (a manifest older than the field)
        is not judged."""
        saved, new = flatten_config(self.config), flatten_config(other.config)
        for field, needs_more, adds in _STATE_SHAPING:
            if field in saved and field in new and needs_more(saved[field], new[field], new):
                return field, saved[field], new[field], adds
        return None


class Checkpointer:
    """Saves and restores one `tf.train.Checkpoint` in a workdir; only the chief keeps files."""

    def __init__(
        self,
        checkpoint: tf.train.Checkpoint,
        workdir: str,
        *,
        is_chief: bool,
        worker_index: int,
        max_to_keep: int,
        read_only: bool = False,
    ):
        """`read_only`: for tools that only restore (the standalone evaluator): nothing is
        created, `save` refuses."""
        self._checkpoint = checkpoint
        self.directory = os.path.join(workdir, "checkpoints")
        self._is_chief = is_chief
        self._read_only = read_only
        # Non-chief workers must take part in a multi-worker save (it has collectives), but write
        # to a scratch directory that is deleted right after.
        self._write_directory = (
            self.directory if is_chief else os.path.join(workdir, f"tmp_worker_{worker_index}")
        )
        self._max_to_keep = max_to_keep
        if is_chief and not read_only:
            tf.io.gfile.makedirs(self.directory)

    def _prefix(self, step: int, directory: str | None = None) -> str:
        return os.path.join(directory or self.directory, f"ckpt-{step}")

    def _written_steps(self) -> list[int]:
        return written_steps(self.directory)

    def complete_steps(self) -> list[int]:
        """Steps whose save finished (manifest present), newest first."""
        return complete_steps(self.directory)

    def read_manifest(self, step: int) -> Manifest:
        return read_manifest(self._prefix(step))

    def save(self, manifest: Manifest) -> str:
        """Writes the checkpoint, then its manifest (the commit marker), then prunes old ones.

        A failed write (a full disk, a lost bucket) leaves a save without a manifest, which is
        never restored: the previous checkpoint stays the newest complete one. It is reported
        as one `CheckpointError` line naming the path.
        """
        if self._read_only:
            raise RuntimeError(f"this Checkpointer of {self.directory} is read-only")
        prefix = self._prefix(manifest.step, self._write_directory)
        try:
            prefix = self._checkpoint.write(prefix)
            if not self._is_chief:
                tf.io.gfile.rmtree(self._write_directory)
                return prefix
            temporary = prefix + ".manifest.json.tmp"
            with tf.io.gfile.GFile(temporary, "w") as f:
                json.dump(dataclasses.asdict(manifest), f, indent=1, sort_keys=True)
            tf.io.gfile.rename(temporary, prefix + ".manifest.json", overwrite=True)
        except (OSError, tf.errors.OpError) as error:
            complete = self.complete_steps()
            intact = (
                f"the previous checkpoint {self._prefix(complete[0])} is intact"
                if complete
                else "there is no earlier complete checkpoint"
            )
            reason = (getattr(error, "message", None) or str(error)).strip().splitlines()
            raise CheckpointError(
                f"cannot write checkpoint {prefix} ({reason[0] if reason else type(error)}); "
                f"{intact}: free space (or fix the file system) and rerun the same command to "
                "resume"
            ) from error
        self._prune(keep_after=manifest.step)
        self._write_state_file()
        return prefix

    def _prune(self, keep_after: int) -> None:
        """Keeps the newest `max_to_keep` complete checkpoints; drops debris of older saves."""
        complete = self.complete_steps()
        for step in self._written_steps():
            if step in complete[: self._max_to_keep] or step > keep_after:
                continue
            for path in tf.io.gfile.glob(self._prefix(step) + ".*"):
                tf.io.gfile.remove(path)

    def _write_state_file(self) -> None:
        """Points TF's `checkpoint` state file at the complete checkpoints, newest last.

        Only a convenience for other tools, so a failure is a warning: the checkpoint itself is
        complete (its manifest is written) and tfscale never reads this file.
        """
        try:
            write_state_file(self.directory, self.complete_steps()[::-1])
        except (OSError, tf.errors.OpError) as error:
            logging.warning(
                "cannot update %s (%s); the checkpoint itself is complete",
                os.path.join(self.directory, STATE_FILE),
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__,
            )

    def restore_latest(self, expected: Manifest) -> Manifest | None:
        """Restores the newest readable checkpoint; None only if the workdir has none at all.

        Order: (1) list complete checkpoints, newest first; (2) refuse one written for another
        model or optimizer (a user error, not damage); (3) restore, checking every object in this
        run matched; (4) if it is damaged, say so and fall back to the next older one; (5) if
        checkpoints exist but none could be read, fail: never a silent fresh start.
        """
        written = self._written_steps()
        complete = self.complete_steps()
        if not written:
            return None
        for step in written:
            if step not in complete:
                logging.warning(
                    "ignoring %s: its save never finished (no manifest)", self._prefix(step)
                )
        failures = []
        for step in complete:
            try:
                manifest = self.read_manifest(step)
            except (ValueError, TypeError, tf.errors.OpError) as error:
                failures.append(f"ckpt-{step}: unreadable manifest ({error})")
                logging.warning(
                    "checkpoint ckpt-%d has a damaged manifest; trying an older one", step
                )
                continue
            _refuse_state_change(self._prefix(step), manifest, expected)
            problem = manifest.incompatibility(expected)
            if problem:
                raise CheckpointError(
                    f"{self._prefix(step)} was written for {problem}; resume with the config it "
                    f"was written with, or use a new --workdir to start a different run"
                )
            try:
                self._read(step)
            # Damage shows up as many error types (OpError, IndexError on truncation, ...); any of
            # them makes this checkpoint unusable, and every reason is reported if none works.
            except Exception as error:  # noqa: BLE001
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                failures.append(f"ckpt-{step}: {type(error).__name__}: {first_line}")
                logging.warning(
                    "checkpoint ckpt-%d is damaged (%s); trying an older one", step, first_line
                )
                continue
            logging.info("restored %s", self._prefix(step))
            return manifest
        raise CheckpointError(
            f"{self.directory} has checkpoints but none can be read "
            f"({'; '.join(failures) or 'no complete save'}); move the directory away to start "
            "from scratch"
        )

    def _read(self, step: int) -> None:
        """Restores ckpt-STEP into this run's objects, checking every one of them got a value."""
        self._checkpoint.read(self._prefix(step)).assert_existing_objects_matched()

    def restore(self, step: int, expected: Manifest) -> Manifest:
        """Restores the complete checkpoint at `step`, with no fallback (tools that read a run).

        Raises:
          CheckpointError: it is incomplete, gone (pruned meanwhile), or for another model.
          Anything `tf.train.Checkpoint.read` raises on a damaged checkpoint.
        """
        try:
            manifest = self.read_manifest(step)
        except tf.errors.NotFoundError as error:
            raise CheckpointError(
                f"{self._prefix(step)} is not a complete checkpoint (no manifest)"
            ) from error
        problem = manifest.incompatibility(expected)
        if problem:
            raise CheckpointError(f"{self._prefix(step)} was written for {problem}")
        self._read(step)
        logging.info("restored %s", self._prefix(step))
        return manifest


def _refuse_state_change(prefix: str, saved: Manifest, expected: Manifest) -> None:
    """A changed config field that needs variables the checkpoint lacks, as one line with the
    field, both values and the ways out (instead of TF's list of unmatched variables)."""
    change = saved.state_change(expected)
    if change is None:
        return
    field, old, new, adds = change
    raise ConfigError(
        f"{field} changed on resume from {json.dumps(old)} (in {prefix}) to {json.dumps(new)}, "
        f"which needs {adds} that the checkpoint does not hold: resume with "
        f"--config.{field}={old}, or start a new --workdir (with "
        f"--config.init_checkpoint={prefix} to fine-tune from these weights)"
    )


def written_steps(directory: str) -> list[int]:
    """Steps with an index file in `directory`, complete or not, newest first."""
    names = tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index"))
    return sorted((int(_CKPT.search(n).group(1)) for n in names), reverse=True)


def complete_steps(directory: str) -> list[int]:
    """Steps in `directory` whose save finished (manifest present), newest first."""
    return [
        step
        for step in written_steps(directory)
        if tf.io.gfile.exists(os.path.join(directory, f"ckpt-{step}.manifest.json"))
    ]


def read_manifest(prefix: str) -> Manifest:
    """The manifest of the checkpoint at `prefix` (`.../ckpt-STEP`)."""
    with tf.io.gfile.GFile(prefix + ".manifest.json") as f:
        return Manifest(**json.load(f))


def write_state_file(directory: str, steps: list[int]) -> None:
    """Writes TF's `checkpoint` state file listing ckpt-STEP for `steps` (oldest first).

    The CheckpointState text proto, with paths relative to `directory` (as CheckpointManager
    writes them, so the directory can move) and each manifest's time as the checkpoint's
    timestamp. Written here because `tf.compat.v1.train.update_checkpoint_state` is deprecated;
    the names are always `ckpt-<int>`, so no quoting is needed. Atomic: temporary file + rename.
    """
    if not steps:
        return
    lines = [f'model_checkpoint_path: "ckpt-{steps[-1]}"']
    lines += [f'all_model_checkpoint_paths: "ckpt-{step}"' for step in steps]
    for step in steps:
        stat = tf.io.gfile.stat(os.path.join(directory, f"ckpt-{step}.manifest.json"))
        lines.append(f"all_model_checkpoint_timestamps: {stat.mtime_nsec / 1e9:.3f}")
    path = os.path.join(directory, STATE_FILE)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, Manifest]:
    """Resolves a tfscale run, checkpoint directory or checkpoint prefix to (prefix, manifest).

    `path` may be a workdir (WORKDIR/checkpoints is used), a directory of ckpt-STEP files, or a
    prefix `.../ckpt-STEP`. Only complete checkpoints (with a manifest) count; `step` picks one,
    else the newest.

    Raises:
      CheckpointError: nothing complete there, or not at `step`; the message lists what is.
    """
    path = path.rstrip("/")
    if tf.io.gfile.exists(path + ".index"):
        if not tf.io.gfile.exists(path + ".manifest.json"):
            raise CheckpointError(
                f"{path} has no manifest ({path}.manifest.json): its save never finished, or it "
                "was not written by tfscale"
            )
        return path, read_manifest(path)
    directory = path
    if tf.io.gfile.isdir(os.path.join(path, "checkpoints")):
        directory = os.path.join(path, "checkpoints")
    steps = complete_steps(directory)
    if not steps:
        raise CheckpointError(
            f"no complete checkpoint in {directory} (a tfscale workdir, its checkpoints "
            "directory, or a .../ckpt-STEP prefix is expected)"
        )
    if step is None:
        step = steps[0]
    elif step not in steps:
        raise CheckpointError(
            f"no complete checkpoint at step {step} in {directory}; complete steps: "
            f"{', '.join(map(str, sorted(steps)))}"
        )
    prefix = os.path.join(directory, f"ckpt-{step}")
    return prefix, read_manifest(prefix)


def seed_generator_states(model) -> list[tf.Variable]:
    """The RNG states of Keras 3 layers (e.g. Dropout), which tf.train.Checkpoint does not track.

    Without them a resumed run draws different dropout masks than an uninterrupted one. Keras
    lists them in `model.variables` but not in `model.weights`.
    """
    weights = {id(w) for w in model.weights}
    return [v.value for v in model.variables if id(v) not in weights]

"""The manual LR override file, `WORKDIR/lr_override.json`: reading, checking, applying, renaming.

The file holds `{"set": LR}` or `{"multiply": FACTOR}`. It is hand-written, often on Windows, so
it is decoded as UTF-8 with or without a BOM, or as UTF-16/UTF-32 with a BOM (what PowerShell 5's
`>` writes). `OverrideAction` runs the protocol below at every loop boundary (trainer/actions.py);
the LR math is the schedule's (`learning_rate.ControlledSchedule.set` / `scale`).

Contract with the caller, at a loop boundary:

1. `take_pending(workdir, step)` returns the pending `Request`, or None. A bad file raises
   `Rejected` after it is renamed `lr_override.rejected-STEP.json`: it acts once, leaves a
   record, and the caller logs the message and trains on (a typo must not kill a long run).
2. The caller applies the request, then saves a checkpoint, then calls `mark_applied`, which
   renames the file `lr_override.applied-STEP.json`. Until then the file stays pending, so a crash
   between applying and checkpointing re-applies it on the rerun instead of losing it.
3. Trap: a pending file is returned again by every `take_pending`, so the caller must checkpoint
   and call `mark_applied` before the next one, or a multiply would be applied once per loop.
   A valid request that cannot be applied (a set where the schedule is 0) gets `mark_rejected`.

Multi-worker runs: only the chief reads and renames the file; `broadcast_from_chief` hands its
request (or None) to every worker through one small all-reduce at the same loop boundary, so all
workers apply the same LR from the same step.

Known windows, both the length of one rename: a crash after the checkpoint but before
`mark_applied` re-applies the request on the rerun (harmless for "set", doubles a "multiply"); a
file replaced by a new one between `take_pending` and `mark_applied` is marked applied unread.
Writing the file elsewhere and moving it into place avoids reading it half-written (that reads
as a rejection; write it again). Cost: one read attempt per loop boundary (a `gs://` GET).
"""

import dataclasses
import json
import math

import tensorflow as tf
from absl import logging

from trainer.actions import Action, Decision
from trainer.errors import ConfigError

OVERRIDE_FILE = "lr_override.json"
ACTIONS = ("set", "multiply")
_SHOWN_CHARS = 200  # How much of a rejected file goes into the (one-line) message.
_NO_REQUEST = 0.0  # A request as the [action code, value] pair broadcast to the workers.
_ACTION_CODES = {"set": 1.0, "multiply": 2.0}

# Longest first: the UTF-32 LE BOM starts with the UTF-16 LE one.
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked override: `action` is "set" (the LR) or "multiply" (the LR by `value`)."""

    action: str
    value: float

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}, use 'set' or 'multiply'")
        if not math.isfinite(self.value):
            raise ValueError(f"{self.action} value {self.value} is not a finite number")
        if self.value <= 0:
            raise ValueError(f"{self.action} value {self.value} is not > 0")

    def __str__(self) -> str:
        return json.dumps({self.action: self.value})  # As written in the file, for logs.


class Rejected(ValueError):
    """A bad override file. The one-line message names the file, the problem and the fix."""

    def __init__(self, path: str, received: str | bytes, problem: str, kept_as: str | None = None):
        self.path = path
        self.received = received
        self.problem = problem
        self.kept_as = kept_as
        shown = repr(received[:_SHOWN_CHARS])
        if len(received) > _SHOWN_CHARS:
            unit = "bytes" if isinstance(received, bytes) else "characters"
            shown += f"... ({len(received)} {unit} in all)"
        ignored = f"ignored it (kept as {kept_as})" if kept_as else "ignored it"
        super().__init__(
            f'{path} must hold {{"set": LR}} or {{"multiply": FACTOR}} with a positive number, '
            f"got {shown} ({problem}); {ignored}, write a new one"
        )


def _decode(raw: bytes) -> str:
    """UTF-8 with or without a BOM, UTF-16/32 only with one (it says which byte order)."""
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return raw[len(bom) :].decode(codec)
    return raw.decode("utf-8")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {keys}")  # json would silently keep the last one.
    return dict(pairs)


def parse(raw: bytes, path: str) -> Request:
    """Decodes and checks the bytes of an override file.

    Args:
      raw: the file's contents.
      path: the file's path, for the error message.

    Returns:
      The request it holds.

    Raises:
      Rejected: undecodable, not JSON, not a one-key object, unknown action, a value that is not
        a number (booleans are not numbers), not finite or not > 0.
    """
    try:
        text = _decode(raw)
    except UnicodeDecodeError:
        problem = "not UTF-8, nor UTF-16 or UTF-32 with a byte-order mark: save it as UTF-8"
        raise Rejected(path, raw, problem) from None
    if "\x00" in text:
        problem = "NUL characters: UTF-16 without a byte-order mark? save it as UTF-8"
        raise Rejected(path, text, problem)
    if not text.strip():
        raise Rejected(path, text, "the file is empty")
    try:
        content = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise Rejected(path, text, f"not JSON: {error}") from None
    except (ValueError, RecursionError) as error:  # Duplicate keys; absurdly deep nesting.
        raise Rejected(path, text, f"not valid: {error}") from None
    if not isinstance(content, dict) or len(content) != 1:
        raise Rejected(path, text, "not an object with exactly one key")
    ((action, value),) = content.items()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(path, text, f"{action} value {json.dumps(value)} is not a number")
    try:
        return Request(action, float(value))
    except (OverflowError, ValueError) as error:  # OverflowError: an int beyond float range.
        problem = str(error) if isinstance(error, ValueError) else f"{action} value is too large"
        raise Rejected(path, text, problem) from None


def _path(workdir: str, name: str = OVERRIDE_FILE) -> str:
    return f"{workdir}/{name}"


def take_pending(workdir: str, step: int) -> Request | None:
    """Reads `WORKDIR/lr_override.json` if there is one; it stays pending until `mark_applied`.

    Args:
      workdir: the run's directory (local or `gs://`).
      step: the current step, names the record of a rejected file.

    Returns:
      The pending request, or None if there is no file.

    Raises:
      Rejected: the file is bad; it has been renamed `lr_override.rejected-STEP.json`. Log the
        message and train on.
    """
    path = _path(workdir)
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            raw = f.read()
    except tf.errors.NotFoundError:  # The usual case. Reading directly saves an exists() call.
        return None
    try:
        return parse(raw, path)
    except Rejected as error:
        kept_as = mark_rejected(workdir, step)
        raise Rejected(error.path, error.received, error.problem, kept_as) from None


def _rename(workdir: str, step: int, outcome: str) -> str | None:
    renamed = _path(workdir, f"lr_override.{outcome}-{step}.json")
    try:
        tf.io.gfile.rename(_path(workdir), renamed, overwrite=True)
    except tf.errors.NotFoundError:  # Deleted by hand meanwhile: nothing left to mark.
        return None
    return renamed


def mark_applied(workdir: str, step: int) -> str | None:
    """Renames the pending file `lr_override.applied-STEP.json`. Call only once the change is in a
    saved checkpoint. Returns the new path, or None if the file is gone."""
    return _rename(workdir, step, "applied")


def mark_rejected(workdir: str, step: int) -> str | None:
    """Renames the pending file `lr_override.rejected-STEP.json`, e.g. for a valid request that
    cannot be applied. Returns the new path, or None if the file is gone."""
    return _rename(workdir, step, "rejected")


def broadcast_from_chief(strategy, request: Request | None) -> Request | None:
    """The chief's `request` (None: none pending) on every worker of a multi-worker run.

    A collective: every worker must call it at the same loop boundary, each loop, whether or not
    it has a request (only the chief's is used). The pair [action code, value] travels as
    float64, so the value every worker applies is the chief's Python float, bit for bit; only
    the chief's first replica (global replica 0: TF numbers the chief's replicas first)
    contributes, every other replica adds zeros. Cost: one all-reduce of 2 numbers and a host
    read (measured in BUILD_NOTES).
    """
    code = _NO_REQUEST if request is None else _ACTION_CODES[request.action]
    value = 0.0 if request is None else request.value

    def contribution(context: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        mine = context.replica_id_in_sync_group == 0
        return tf.constant([code, value] if mine else [0.0, 0.0], tf.float64)

    pairs = strategy.experimental_distribute_values_from_function(contribution)
    code, value = strategy.reduce(tf.distribute.ReduceOp.SUM, pairs, axis=None).numpy()
    if code == _NO_REQUEST:
        return None
    action = {number: name for name, number in _ACTION_CODES.items()}[code]
    return Request(action, float(value))


def apply(request: Request, schedule, step: int) -> str:
    """Applies `request` to the next update of `schedule` (a `learning_rate.ControlledSchedule`);
    returns the LR event.

    Raises:
      ConfigError: a "set" where the schedule is 0 (nothing to scale from).
    """
    reason = f"manual override {request}"
    if request.action == "multiply":
        return schedule.scale(request.value, step, reason)
    return schedule.set(request.value, step, reason)


class OverrideAction(Action):
    """Takes a pending override at every boundary, last (`before_save`: it has the last word on
    the LR), asks for a save, and marks the file applied once that save is durable."""

    def __init__(self):
        self._pending_mark = False

    def before_save(self, run) -> Decision | None:
        """The chief reads the file; on a multi-worker run it broadcasts what it read, so every
        worker takes part in this collective at the same boundary and applies the same request."""
        step, topology = run.step, run.topology
        request, events = None, []
        if topology.is_chief:
            try:
                request = take_pending(run.workdir, step)
            except Rejected as rejected:
                logging.error("%s", rejected)
                events = [str(rejected)]
        if topology.num_workers > 1:
            request = broadcast_from_chief(run.strategy, request)
        if request is None:
            run.log_events(events)
            return None
        try:
            event = apply(request, run.schedule, step)
        except ConfigError as error:  # A set where the schedule is 0: nothing to scale from.
            message = f"ignored manual override {request}: {error}"
            if topology.is_chief:
                mark_rejected(run.workdir, step)
                logging.error("%s", message)
            run.log_events([message])
            return None
        logging.info("worker %d: %s", topology.worker_index, event)  # Every worker says it.
        run.log_events([event])
        self._pending_mark = True
        return Decision(save=True)

    def after_save(self, run) -> None:
        if self._pending_mark and run.topology.is_chief:  # Durable now: it may leave the queue.
            mark_applied(run.workdir, run.step)
        self._pending_mark = False

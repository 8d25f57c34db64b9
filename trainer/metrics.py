"""Where training numbers go: metrics.jsonl, TensorBoard event files and a console progress line."""

import json
import math
import os
import time

import numpy as np
import tensorflow as tf
from absl import logging
from tensorboard.plugins.scalar import metadata as scalar_metadata

from trainer.errors import UserError
from trainer.loop import SIGNALS

METRICS_FILE = "metrics.jsonl"  # One record per log step, eval, LR change or health event.
STEPS_FILE = "health_steps.jsonl"  # One record per update: the SIGNALS of trainer/loop.py.

# Record key -> TensorBoard tag and its description (what, unit, global or per replica). The
# task's metrics (trainer/task.py) get theirs from `_tag`; other keys keep their name.
TAGS = {
    "loss": (
        "metrics/loss",
        "Training loss of each update: mean cross-entropy (plus any L2 term) over the global "
        "batch, all replicas together; nats.",
    ),
    "eval_loss": (
        "metrics/loss",
        "Eval loss: mean cross-entropy over the whole eval split, all replicas together; nats.",
    ),
    "learning_rate": (
        "lr/learning_rate",
        "The LR the optimizer applied in each update, read inside that update; global (the same "
        "on every replica).",
    ),
    "grad_norm": (
        "health/grad_norm",
        "L2 norm of each update's all-reduced (global) gradient, before any clipping.",
    ),
    "param_norm": ("health/param_norm", "L2 norm of all trainable weights before each update."),
    "update_norm": (
        "health/update_norm",
        "L2 norm of the change each update made to the weights, measured (new minus old).",
    ),
    "update_ratio": (
        "health/update_ratio",
        "update_norm / param_norm of each update; dimensionless (rule of thumb: ~1e-3).",
    ),
    "loss_max": (
        "health/loss_max",
        "Highest per-update training loss since the previous log; global batch; nats.",
    ),
    "skipped_updates": (
        "health/skipped_updates",
        "Updates dropped so far by health.action=skip (loss or gradient-norm spikes); count.",
    ),
    "health_event": (
        "health/event",
        "A marker at each health event: the number of its kind (trainer/health KINDS, from 1).",
    ),
    "examples_per_sec": (
        "perf/examples_per_sec",
        "Training throughput since the previous log, all replicas and workers; examples/s.",
    ),
    "examples_seen": (
        "progress/examples_seen",
        "Examples consumed by training so far (the input position); count, global.",
    ),
    "epoch": ("progress/epoch", "Passes over the train split so far: examples_seen / its size."),
}
PLANNED_LR = (
    "The LR the plan schedules for each update (warmup + decay, before any mid-run change); global."
)
# Train values that `write_steps` puts in TensorBoard at every update.
PER_STEP = ("loss", "learning_rate", "grad_norm", "param_norm", "update_norm", "update_ratio")


class MetricWriter:
    """Writes one record per logged step. Only the chief writes; other workers get a no-op.

    The JSONL file is appended and flushed per record, and on resume records past the restored
    step are dropped first, so each step appears once even after a crash between a log and the
    next checkpoint. Records carry the optimizer step; the progress line counts plan steps
    (`step + step_offset`, as `total_steps` does) so step/total and the ETA agree after the global
    batch changed on resume. A failed write (e.g. a full disk) is one `MetricsWriteError` line.

    TensorBoard gets three runs: `train/` and `eval/` use the same tag names (`metrics/loss`,
    `metrics/NAME` for each of `task_metrics`), so their curves overlay; the top-level run
    holds the plan, the config and the planned LR under the applied LR's tag
    (`lr/learning_rate`), so those overlay too.
    Tags are grouped by prefix and each carries a description (`TAGS`). The per-update signals
    (`write_steps`) go to `health_steps.jsonl` and, at every step, to the train run.
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool,
        total_steps: int,
        resume_step: int,
        step_offset: int = 0,
        task_metrics: tuple[str, ...] = (),
    ):
        self._enabled = enabled
        self._task_metrics = task_metrics  # Their train records get `metrics/NAME` tags too.
        self._total_steps = total_steps
        self._step_offset = step_offset
        self._start_time = time.monotonic()
        self._start_step = resume_step + step_offset
        if not enabled:
            return
        self._path = os.path.join(workdir, METRICS_FILE)
        self._steps_path = os.path.join(workdir, STEPS_FILE)
        self._jsonl = self._steps_jsonl = None
        self.rewind(resume_step)
        logdir = os.path.join(workdir, "tensorboard")
        self._plan_writer = tf.summary.create_file_writer(logdir)
        self._writers = {
            kind: tf.summary.create_file_writer(os.path.join(logdir, kind))
            for kind in ("train", "eval")
        }
        self._write_step_scalars = _step_scalar_writer(self._writers["train"])

    def rewind(self, step: int) -> None:
        """Forgets records after `step` (the run continues from there: resume, NaN recovery)."""
        if not self._enabled:
            return
        for handle in (self._jsonl, self._steps_jsonl):
            if handle:
                handle.close()
        _truncate_after(self._path, step)
        _truncate_after(self._steps_path, step)
        self._jsonl = tf.io.gfile.GFile(self._path, "a")
        self._steps_jsonl = tf.io.gfile.GFile(self._steps_path, "a")
        self._start_time, self._start_step = time.monotonic(), step + self._step_offset

    def write(self, step: int, record: dict[str, float], kind: str = "train") -> None:
        """Appends `{"step": step, **record}` and mirrors the scalars to TensorBoard.

        Train values that `write_steps` records at every step (loss, LR, norms) are left out of
        TensorBoard here: a window mean next to the per-step points would draw a second curve.
        """
        if not self._enabled:
            return
        try:
            self._append(self._jsonl, {"step": step, **record})
            writer = self._writers.get(kind)
            if writer is not None:
                with writer.as_default(step=step):
                    for name, value in record.items():
                        if isinstance(value, (int, float)) and not (
                            kind == "train" and name in PER_STEP
                        ):
                            self._scalar(name, value)
                writer.flush()
        except (OSError, tf.errors.OpError) as error:
            raise MetricsWriteError(self._path, error) from error
        logging.info("%s", self._progress_line(step, record, kind))

    def write_steps(self, first_step: int, steps: np.ndarray) -> None:
        """Records the per-update signals of one inner loop: row i is update `first_step + i`.

        One line per update in health_steps.jsonl, and a point per update in TensorBoard, written
        by one compiled call (eager, each scalar costs ~0.6 ms: ~2% of a default inner loop).
        """
        if not self._enabled or not len(steps):
            return
        lines = [
            json.dumps({"step": first_step + i, **dict(zip(SIGNALS, map(float, row), strict=True))})
            for i, row in enumerate(steps)
        ]
        try:
            self._steps_jsonl.write("\n".join(lines) + "\n")
            self._steps_jsonl.flush()
            self._write_step_scalars(
                tf.constant(steps, tf.float32), tf.constant(first_step, tf.int64)
            )
            self._writers["train"].flush()
        except (OSError, tf.errors.OpError) as error:
            raise MetricsWriteError(self._steps_path, error) from error

    def write_event(self, step: int, event: dict, marker: float) -> None:
        """A health event: a `kind: health` record, a TensorBoard text and marker, a console line.

        `event` holds `health` (the detector), `message` and the numbers it saw; `marker` is the
        value of its point under `health/event` (the kind's number).
        """
        if not self._enabled:
            return
        try:
            self._append(self._jsonl, {"step": step, "kind": "health", **event})
            writer = self._writers["train"]
            with writer.as_default(step=step):
                tf.summary.text("health/events", f"{event['health']}: {event['message']}")
                self._scalar("health_event", marker)
            writer.flush()
        except (OSError, tf.errors.OpError) as error:
            raise MetricsWriteError(self._path, error) from error
        logging.warning("health | step: %d | %s | %s", step, event["health"], event["message"])

    @staticmethod
    def _append(handle, record: dict) -> None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()

    def _progress_line(self, step: int, record: dict[str, float], kind: str) -> str:
        step += self._step_offset
        elapsed = time.monotonic() - self._start_time
        steps_per_sec = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self._total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
        fields = [f"{kind} | step: {step}/{self._total_steps}"]
        if kind == "train":
            fields.append(f"steps/sec: {steps_per_sec:.2f} | eta: {_format_seconds(eta)}")
        fields += [f"{k}: {v:.5g}" for k, v in record.items() if isinstance(v, float)]
        return " | ".join(fields)

    def write_text(self, name: str, text: str, step: int = 0) -> None:
        """Records text (the resolved config, the plan) in TensorBoard's top-level run."""
        if self._enabled:
            with self._plan_writer.as_default(step=step):
                tf.summary.text(name, text)

    def write_lr_curve(self, curve: list[float], max_points: int = 1000) -> None:
        """The planned LR curve (curve[i] is update i + 1), under the applied LR's tag in the
        top-level run, so TensorBoard overlays plan and reality.

        Subsampled to at most `max_points` evenly strided steps, the first and last included:
        each eager scalar costs ~0.6 ms, so a 100k-step curve in full stalled start-up ~1 min.
        """
        if not self._enabled or not curve:
            return
        stride = max(1, math.ceil((len(curve) - 1) / max(max_points - 1, 1)))
        indices = list(range(0, len(curve), stride))
        if indices[-1] != len(curve) - 1:
            indices.append(len(curve) - 1)
        with self._plan_writer.as_default():
            for index in indices:
                self._scalar("learning_rate", curve[index], step=index + 1, description=PLANNED_LR)
        self._plan_writer.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._steps_jsonl.close()
            for writer in (self._plan_writer, *self._writers.values()):
                writer.close()

    def _scalar(self, name: str, value, step=None, description: str | None = None) -> None:
        tag, default = _tag(name, self._task_metrics)
        tf.summary.scalar(tag, value, step=step, description=description or default)


def _tag(name: str, task_metrics: tuple[str, ...]) -> tuple[str, str | None]:
    """The TensorBoard tag and description of a record key. A task metric's train value and its
    eval (`eval_NAME`) share `metrics/NAME`, in the train and eval runs, so the curves overlay;
    its EMA eval (`ema_eval_NAME`) is `metrics/ema_NAME`."""
    if name in TAGS:
        return TAGS[name]
    for prefix, tag_prefix, what in (
        ("ema_eval_", "metrics/ema_", "Eval {} of the EMA of the weights (ema_decay)"),
        ("eval_", "metrics/", "Eval {}"),
        ("", "metrics/", "Training {}, mean over the updates since the previous log"),
    ):
        metric = name.removeprefix(prefix) if name.startswith(prefix) else None
        if metric == "loss" or metric in task_metrics:
            where = "the whole eval split" if prefix else "the global batch"
            return tag_prefix + metric, f"{what.format(metric)} over {where} (trainer/task.py)."
    return name, None


def _step_scalar_writer(writer):
    """A compiled function writing a `[n, len(SIGNALS)]` matrix as n points per PER_STEP tag.

    `tf.summary.write` with the scalar plugin's metadata, not `tf.summary.scalar`: inside the
    compiled loop the latter would prefix every tag with the loop's name scope ("while/").
    """
    column = {name: SIGNALS.index(name) for name in PER_STEP if name in SIGNALS}
    metadata = {
        name: scalar_metadata.create_summary_metadata(
            display_name=TAGS[name][0], description=TAGS[name][1]
        ).SerializeToString()
        for name in PER_STEP
    }

    def point(name: str, value: tf.Tensor, step: tf.Tensor) -> None:
        tf.summary.write(TAGS[name][0], value, step=step, metadata=metadata[name])

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, len(SIGNALS)], tf.float32),
            tf.TensorSpec([], tf.int64),
        ]
    )
    def write(steps: tf.Tensor, first_step: tf.Tensor) -> None:
        with writer.as_default():
            for i in tf.range(tf.shape(steps)[0]):
                step = first_step + tf.cast(i, tf.int64)
                for name, index in column.items():
                    point(name, steps[i, index], step)
                ratio = steps[i, column["update_norm"]] / steps[i, column["param_norm"]]
                point("update_ratio", ratio, step)

    return write


def _truncate_after(path: str, step: int) -> None:
    """Drops records logged after `step` (the resumed run redoes them) and a torn last line.

    Rewritten (via a temporary file, so a crash here loses nothing) only if that changes the
    file. It then ends with a newline, so the next record starts on a line of its own even when
    a crash cut only the last record's newline.
    """
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    kept = b"".join(line + b"\n" for line, record in _parse(path, data) if record["step"] <= step)
    if kept != data:
        temporary = path + ".tmp"
        with tf.io.gfile.GFile(temporary, "wb") as f:
            f.write(kept)
        tf.io.gfile.rename(temporary, path, overwrite=True)


class MetricsWriteError(UserError):
    """metrics.jsonl or the event files could not be written (e.g. the disk is full)."""

    def __init__(self, path: str, error: Exception):
        reason = getattr(error, "message", None) or str(error)
        super().__init__(
            f"cannot write {path} ({reason.strip().splitlines()[0]}); the newest checkpoint is "
            "intact: free space (or fix the file system) and rerun the same command to resume"
        )


class MetricsFileError(UserError, ValueError):
    """metrics.jsonl is damaged before its last line: not what a crash leaves, so not guessed at."""


def _parse(path: str, data: bytes) -> list[tuple[bytes, dict]]:
    """The (line, record) pairs of a metrics.jsonl file's content; blank lines are skipped.

    A crash or a full disk can cut the last write short, so a last line that is not a record is
    left out with a warning. Records after a bad line mean something else damaged the file.

    Raises:
      MetricsFileError: a line other than the last one is not a JSON record with a "step".
    """
    numbered = [(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    parsed = []
    for index, (number, line) in enumerate(numbered):
        try:  # Bytes, not text: a torn tail can end inside a UTF-8 character.
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors.
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            parsed.append((line, record))
        elif index == len(numbered) - 1:
            logging.warning(
                "%s line %d is an incomplete record (a crash or a full disk cut the write "
                "short); leaving it out",
                path,
                number,
            )
        else:
            raise MetricsFileError(
                f"{path} line {number}: not a JSON record with a step, and records follow it; "
                f"fix or remove that line, or move {os.path.basename(path)} away"
            )
    return parsed


def _format_seconds(seconds: float) -> str:
    if seconds != seconds:  # NaN: unknown yet.
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def read_records(workdir: str, name: str = METRICS_FILE) -> list[dict]:
    """Reads metrics.jsonl (or `name`, e.g. STEPS_FILE) back (tests, tools), leaving out a torn
    last line like a resume does; a file still being written by a running trainer reads too.

    Raises:
      MetricsFileError: a line before the last one is not a record.
    """
    path = os.path.join(workdir, name)
    with tf.io.gfile.GFile(path, "rb") as f:
        return [record for _, record in _parse(path, f.read())]


def read_steps(workdir: str) -> dict[str, np.ndarray]:
    """health_steps.jsonl as one array per column: `step` and each of SIGNALS (empty if none)."""
    path = os.path.join(workdir, STEPS_FILE)
    records = read_records(workdir, STEPS_FILE) if tf.io.gfile.exists(path) else []
    return {
        name: np.array([r[name] for r in records], np.int64 if name == "step" else np.float64)
        for name in ("step", *SIGNALS)
    }

"""Where training numbers go: metrics.jsonl, TensorBoard event files and a console progress line."""

import json
import math
import os
import time

import tensorflow as tf
from absl import logging

from trainer.errors import UserError


class MetricWriter:
    """Writes one record per logged step. Only the chief writes; other workers get a no-op.

    The JSONL file is appended and flushed per record, and on resume records past the restored
    step are dropped first, so each step appears once even after a crash between a log and the
    next checkpoint. Records carry the optimizer step; the progress line counts plan steps
    (`step + step_offset`, as `total_steps` does) so step/total and the ETA agree after the global
    batch changed on resume. A failed write (e.g. a full disk) is one `MetricsWriteError` line.
    """

    def __init__(
        self,
        workdir: str,
        *,
        enabled: bool,
        total_steps: int,
        resume_step: int,
        step_offset: int = 0,
    ):
        self._enabled = enabled
        self._total_steps = total_steps
        self._step_offset = step_offset
        self._start_time = time.monotonic()
        self._start_step = resume_step + step_offset
        if not enabled:
            return
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = None
        self.rewind(resume_step)
        self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def rewind(self, step: int) -> None:
        """Forgets records after `step` (the run continues from there: resume, NaN recovery)."""
        if not self._enabled:
            return
        if self._jsonl:
            self._jsonl.close()
        _truncate_after(self._path, step)
        self._jsonl = tf.io.gfile.GFile(self._path, "a")
        self._start_time, self._start_step = time.monotonic(), step + self._step_offset

    def write(self, step: int, record: dict[str, float], kind: str = "train") -> None:
        """Appends `{"step": step, **record}` and mirrors the scalars to TensorBoard."""
        if not self._enabled:
            return
        try:
            self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self._jsonl.flush()
            with self._summary.as_default(step=step):
                for name, value in record.items():
                    if isinstance(value, (int, float)):
                        tf.summary.scalar(name, value)
            self._summary.flush()
        except (OSError, tf.errors.OpError) as error:
            raise MetricsWriteError(self._path, error) from error
        logging.info("%s", self._progress_line(step, record, kind))

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
        """Records text (the resolved config, the plan) in TensorBoard."""
        if self._enabled:
            with self._summary.as_default(step=step):
                tf.summary.text(name, text)

    def write_lr_curve(self, curve: list[float], max_points: int = 1000) -> None:
        """The planned LR curve (curve[i] is update i + 1), next to the applied LR in TensorBoard.

        Subsampled to at most `max_points` evenly strided steps, the first and last included:
        each eager scalar costs ~0.6 ms, so a 100k-step curve in full stalled start-up ~1 min.
        """
        if not self._enabled or not curve:
            return
        stride = max(1, math.ceil((len(curve) - 1) / max(max_points - 1, 1)))
        indices = list(range(0, len(curve), stride))
        if indices[-1] != len(curve) - 1:
            indices.append(len(curve) - 1)
        with self._summary.as_default():
            for index in indices:
                tf.summary.scalar("planned_learning_rate", curve[index], step=index + 1)
        self._summary.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._summary.close()


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


def read_records(workdir: str) -> list[dict]:
    """Reads metrics.jsonl back (tests, tools), leaving out a torn last line like a resume does.

    Raises:
      MetricsFileError: a line before the last one is not a record.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    with tf.io.gfile.GFile(path, "rb") as f:
        return [record for _, record in _parse(path, f.read())]

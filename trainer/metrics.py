"""Where training numbers go: metrics.jsonl, TensorBoard event files and a console progress line."""

import json
import math
import os
import time

import tensorflow as tf
from absl import logging


class MetricWriter:
    """Writes one record per logged step. Only the chief writes; other workers get a no-op.

    The JSONL file is appended and flushed per record, and on resume records past the restored
    step are dropped first, so each step appears once even after a crash between a log and the
    next checkpoint.
    """

    def __init__(self, workdir: str, *, enabled: bool, total_steps: int, resume_step: int):
        self._enabled = enabled
        self._total_steps = total_steps
        self._start_time = time.monotonic()
        self._start_step = resume_step
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
        self._start_time, self._start_step = time.monotonic(), step

    def write(self, step: int, record: dict[str, float], kind: str = "train") -> None:
        """Appends `{"step": step, **record}` and mirrors the scalars to TensorBoard."""
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        with self._summary.as_default(step=step):
            for name, value in record.items():
                if isinstance(value, (int, float)):
                    tf.summary.scalar(name, value)
        self._summary.flush()
        logging.info("%s", self._progress_line(step, record, kind))

    def _progress_line(self, step: int, record: dict[str, float], kind: str) -> str:
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
    """Drops records logged after `step`: they belong to steps the resumed run will redo."""
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        with tf.io.gfile.GFile(path, "w") as f:
            f.write("".join(kept))  # GFile has no writelines().


def _format_seconds(seconds: float) -> str:
    if seconds != seconds:  # NaN: unknown yet.
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def read_records(workdir: str) -> list[dict]:
    """Reads metrics.jsonl back (tests, tools)."""
    with tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]

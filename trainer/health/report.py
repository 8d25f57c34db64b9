"""The health report of a run, from what it wrote: WORKDIR/health.json, health.png, a summary.

Reads only files (health_steps.jsonl, the `kind: health` records of metrics.jsonl, the planned LR
in TensorBoard's top-level run), so it works for any run, also one still training; the trainer
writes it at the end of a run and `python -m trainer.health --workdir=DIR` on demand.
"""

import glob
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.util import event_pb2

from trainer import health, metrics, plotting
from trainer.errors import UserError

REPORT_FILE = "health.json"
PLOT_FILE = "health.png"
_COLORS = {
    "spike": "tab:orange",
    "explode": "tab:red",
    "stall": "tab:purple",
    "oscillate": "tab:brown",
    "lr_not_applied": "black",
}


def summarize(workdir: str) -> dict:
    """The report: verdict, updates seen, skipped updates, last loss and LR, every event.

    Raises:
      UserError: `workdir` holds no run (neither health_steps.jsonl nor metrics.jsonl).
    """
    if not any(
        tf.io.gfile.exists(os.path.join(workdir, name))
        for name in (metrics.STEPS_FILE, metrics.METRICS_FILE)
    ):
        raise UserError(
            f"{workdir} holds no run: no {metrics.STEPS_FILE} or {metrics.METRICS_FILE}; pass "
            "the --workdir a trainer wrote to"
        )
    steps = metrics.read_steps(workdir)
    records = metrics.read_records(workdir) if tf.io.gfile.exists(_path(workdir)) else []
    events = [
        health.Event(r["step"], r["health"], r["message"], r["learning_rate"])
        for r in records
        if r.get("kind") == "health"
    ]
    return {
        "verdict": health.classify(events),
        "updates": int(len(steps["step"])),
        "last_step": int(steps["step"][-1]) if len(steps["step"]) else 0,
        "skipped_updates": int(steps["skipped"].sum()),
        "last_loss": float(steps["loss"][-1]) if len(steps["loss"]) else None,
        "last_learning_rate": (
            float(steps["learning_rate"][-1]) if len(steps["learning_rate"]) else None
        ),
        "events": [
            {
                "step": e.step,
                "health": e.kind,
                "message": e.message,
                "learning_rate": e.learning_rate,
            }
            for e in events
        ],
    }


def _path(workdir: str) -> str:
    return os.path.join(workdir, metrics.METRICS_FILE)


def planned_lr(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(updates, LR) of the planned curve the run wrote to TensorBoard's top-level run."""
    points = {}
    for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
        # TFRecordDataset + Event.FromString: `tf.compat.v1.train.summary_iterator` prints an
        # eight-line deprecation notice at the end of every run.
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == metrics.TAGS["learning_rate"][0]:
                    points[event.step] = float(tf.make_ndarray(value.tensor))
    steps = np.array(sorted(points))
    return steps, np.array([points[s] for s in steps])


def plot(workdir: str, summary: dict, path: str) -> None:
    """Loss (log scale) and applied LR against updates, the plan dashed, events marked."""
    steps = metrics.read_steps(workdir)
    with plotting.png(path, (9, 6), rows=2, sharex=True) as (loss_axes, lr_axes):
        _draw(workdir, summary, steps, loss_axes, lr_axes)


def _draw(workdir: str, summary: dict, steps: dict, loss_axes, lr_axes) -> None:
    loss_axes.plot(steps["step"], steps["loss"], lw=0.8, label="loss (per update)")
    loss_axes.set_yscale("log")
    loss_axes.set_ylabel("train loss")
    lr_axes.plot(steps["step"], steps["learning_rate"], lw=1.2, label="applied LR")
    plan_steps, plan_lr = planned_lr(workdir)
    if len(plan_steps):
        lr_axes.plot(plan_steps, plan_lr, "--", color="black", lw=1, zorder=3, label="planned LR")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("update")
    seen = set()
    for event in summary["events"]:
        kind = event["health"]
        for axes in (loss_axes, lr_axes):
            axes.axvline(
                event["step"],
                color=_COLORS[kind],
                alpha=0.6,
                lw=1,
                label=None if kind in seen or axes is lr_axes else kind,
            )
        seen.add(kind)
    loss_axes.set_title(f"{workdir}: {summary['verdict']} ({len(summary['events'])} events)")
    loss_axes.legend(loc="upper right", fontsize=8)
    lr_axes.legend(loc="upper right", fontsize=8)


def write(workdir: str, png: str | None = None) -> dict:
    """Writes health.json and the PNG (WORKDIR/health.png unless `png`), logs a summary."""
    summary = summarize(workdir)
    with tf.io.gfile.GFile(os.path.join(workdir, REPORT_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    png = png or os.path.join(workdir, PLOT_FILE)
    plot(workdir, summary, png)
    logging.info(
        "health | %s | updates: %d | skipped: %d | events: %d | wrote %s, %s",
        summary["verdict"],
        summary["updates"],
        summary["skipped_updates"],
        len(summary["events"]),
        os.path.join(workdir, REPORT_FILE),
        png,
    )
    for event in summary["events"]:
        logging.info(
            "health | step: %d | %s | %s", event["step"], event["health"], event["message"]
        )
    return summary

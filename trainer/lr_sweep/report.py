"""What a sweep writes to WORKDIR/lr_sweep/: lr_sweep.json, lr_sweep.md (the table) and
lr_sweep.png (every trial's smoothed loss, coloured by its reading, the pick drawn thick)."""

import json
import os

import numpy as np
import tensorflow as tf

from trainer import lr_find, metrics, plotting

# How each reading is drawn.
COLOURS = {
    "recommended": "tab:green",
    "healthy": "tab:blue",
    "spikes": "tab:olive",
    "too slow": "tab:cyan",
    "stalls": "tab:purple",
    "oscillates": "tab:brown",
    "explodes": "tab:red",
}


def table(sweep) -> str:
    """The Markdown table of a `lr_sweep.Sweep`: one row per trial, then the pick and why."""
    metric_names = sorted({name for t in sweep.trials for name in t.eval_metrics})
    header = ["lr.base", "peak LR", "reading", "loss at the end", *metric_names, "first event"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in sweep.trials:
        cells = [
            f"{t.base_lr:.4g}",
            f"{t.peak_lr:.4g}",
            f"**{sweep.reading(t)}**" if t is sweep.recommended else sweep.reading(t),
            f"{t.end_loss:.4g}",
            *(f"{t.eval_metrics[m]:.4f}" if m in t.eval_metrics else "" for m in metric_names),
            t.events[0].replace("|", "/") if t.events else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    pick = (
        f"Recommended: lr.base = {sweep.recommended.base_lr:.4g} (peak LR "
        f"{sweep.recommended.peak_lr:.4g} at this global batch): {sweep.reason}."
        if sweep.recommended
        else f"No recommendation: {sweep.reason}."
    )
    return f"{sweep.trial_steps} updates per trial.\n\n" + "\n".join(lines) + f"\n\n{pick}\n"


def write(sweep, directory: str) -> None:
    """lr_sweep.json, lr_sweep.md and lr_sweep.png of a `lr_sweep.Sweep` into `directory`."""
    with tf.io.gfile.GFile(os.path.join(directory, "lr_sweep.json"), "w") as f:
        json.dump(
            {
                "trials": [{**t.to_json(), "reading": sweep.reading(t)} for t in sweep.trials],
                "trial_steps": sweep.trial_steps,
                "recommended_base_lr": sweep.recommended and sweep.recommended.base_lr,
                "recommended_peak_lr": sweep.recommended and sweep.recommended.peak_lr,
                "reason": sweep.reason,
            },
            f,
            indent=1,
        )
    with tf.io.gfile.GFile(os.path.join(directory, "lr_sweep.md"), "w") as f:
        f.write(table(sweep))
    slow = [t for t in sweep.trials if sweep.reading(t) == "too slow"]
    with plotting.png(os.path.join(directory, "lr_sweep.png"), (8, 4.5)) as axes:
        for t in sweep.trials:
            losses = metrics.read_steps(t.workdir)["loss"]
            shown = np.where(np.isfinite(losses), losses, np.nanmax(losses, initial=1.0))
            reading = sweep.reading(t)
            # Too-slow trials fade with distance from the pick, so they can be told apart.
            fade = (slow.index(t) + 1) / (len(slow) + 1) if t in slow else 1.0
            axes.plot(
                np.arange(1, len(losses) + 1),
                lr_find.smooth(list(shown)),
                color=COLOURS[reading],
                alpha=0.3 + 0.7 * fade,
                linewidth=2.5 if t is sweep.recommended else 1.0,
                label=f"lr.base {t.base_lr:.4g}: {reading}",
            )
        axes.set_yscale("log")
        axes.set_xlabel("update")
        axes.set_ylabel("train loss (smoothed)")
        axes.set_title(f"LR sweep, {sweep.trial_steps} updates per trial")
        axes.legend(fontsize=8)

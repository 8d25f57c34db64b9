"""A short stability sweep: trials at a grid of LRs, each judged by the health rules; a pick.

  python -m trainer.lr_sweep --config=configs/default.py --workdir=/tmp/tfscale [--lrs=0.1,0.2]

Each trial is the configured run, compressed to `--trial_steps` updates (the same model, data,
strategy, warmup and decay shape, the decay squeezed into the trial), trained by the real trainer
in its own workdir under WORKDIR/lr_sweep/trials/. The grid is `--lrs` (values of `lr.base`) or
`--factors` around the LR range test's suggestion (`trainer.lr_find`, run first). Every trial
gets the verdict of `health.classify` on the monitor's events (explodes, oscillates, stalls,
spikes, healthy) and its loss at the end; the recommendation is the trial that ended lowest of
those that did not explode, oscillate or stall. Below it in LR, trials are "too slow". Writes
lr_sweep.json, lr_sweep.md (the table) and lr_sweep.png (every trial's loss, coloured by
verdict) to WORKDIR/lr_sweep/, and never touches the run's own files in WORKDIR.

Stopping is cheap: a finished trial is never rerun, an unfinished one resumes from its last
checkpoint, and rerunning the same command continues the same grid. The recommendation is given
as the peak LR at this run's global batch and as the `lr.base` at `lr.reference_batch_size`,
which `python -m trainer.plan` turns into the LR of any other topology.
"""

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np
import tensorflow as tf
from absl import flags, logging

from trainer import cli, lr_find, metrics, plotting, train
from trainer import setup as setup_lib
from trainer.errors import ConfigError, UserError
from trainer.health import report
from trainer.run import NonFiniteLossError

_LRS = flags.DEFINE_list("lrs", [], "Values of lr.base to try; [] = --factors x lr_find's pick.")
_FACTORS = flags.DEFINE_list(
    "factors",
    ["0.25", "0.5", "1", "2", "4"],
    "Multiples of the range test's suggested lr.base to try (without --lrs).",
)
_TRIAL_STEPS = flags.DEFINE_integer(
    "trial_steps",
    0,
    "Updates per trial; 0 = the warmup plus two health.trend_window (what the stall and "
    "oscillation rules need), at most the planned run.",
)

DIRECTORY = "lr_sweep"
GRID_FILE = "grid.json"  # The grid and trial length, fixed when the sweep starts.
TRIAL_FILE = "trial.json"  # In a trial's workdir once it finished: its result.
# The verdicts a recommendation may have: isolated spikes that the run survived are no reason
# to pass over the LR that trained best.
TRAINABLE = ("healthy", "spikes")
END_FRACTION = 0.1  # "The loss at the end": the median over the trial's last 10% of updates.
# How each trial is read, for the table and the plot's colours.
READINGS = {
    "recommended": "tab:green",
    "healthy": "tab:blue",
    "spikes": "tab:olive",
    "too slow": "tab:cyan",
    "stalls": "tab:purple",
    "oscillates": "tab:brown",
    "explodes": "tab:red",
}


@dataclasses.dataclass(frozen=True)
class Trial:
    base_lr: float  # lr.base
    peak_lr: float  # At this run's global batch.
    verdict: str  # health.VERDICTS
    end_loss: float  # inf when the trial ended on a non-finite loss.
    eval_metrics: dict[str, float]  # The final eval; {} when the trial did not finish.
    events: list[str]  # The health events' messages.
    workdir: str


@dataclasses.dataclass(frozen=True)
class Sweep:
    trials: list[Trial]
    trial_steps: int
    recommended: Trial | None
    reason: str

    def reading(self, trial: Trial) -> str:
        """The trial's line in the table: its verdict, or where it stands next to the pick.

        Below the recommended LR, a trial that stalled or ended higher is "too slow"."""
        if trial is self.recommended:
            return "recommended"
        slower = self.recommended is not None and trial.base_lr < self.recommended.base_lr
        if slower and trial.verdict in (*TRAINABLE, "stalls"):
            return "too slow"
        return trial.verdict


def default_trial_steps(warmup_steps: int, total_steps: int, trend_window: int) -> int:
    """The warmup plus two trend windows: one for the stall and oscillation rules to fill and
    one to judge, after the LR peaked. Never more than the planned run."""
    return min(total_steps, warmup_steps + 2 * trend_window)


def trial_config(
    config: ml_collections.ConfigDict, base_lr: float, trial_steps: int
) -> ml_collections.ConfigDict:
    """The run `config` describes, at `lr.base` = `base_lr`, compressed to `trial_steps` updates.

    What would hide or end an instability is off: the NaN policy fails (a recovery would retry
    at a lower LR), the health action only warns (skip and rollback would drop the evidence),
    and LR milestones and reduce-on-plateau (planned for the whole run) do not act. Nothing is
    exported and no best checkpoint is kept.
    """
    trial = ml_collections.ConfigDict(config.to_dict())
    trial.lr.base = base_lr
    trial.total_steps = trial_steps
    trial.total_epochs = None
    trial.total_examples = None
    trial.checkpoint_every_steps = min(config.checkpoint_every_steps, trial_steps)
    trial.lr.milestones = ()
    trial.lr.milestone_values = ()
    trial.lr.plateau_metric = ""
    trial.nan_policy = "fail"
    trial.health.action = "warn"
    trial.export_at_end = False
    trial.best_metric = ""
    trial.profile_steps = ()
    return ml_collections.ConfigDict(trial.to_dict(), type_safe=True)


def end_loss(losses: np.ndarray) -> float:
    """The median loss over the last END_FRACTION of the updates (at least 1); inf if any of
    them is not finite."""
    tail = losses[-max(1, math.ceil(END_FRACTION * len(losses))) :]
    if len(tail) == 0 or not np.all(np.isfinite(tail)):
        return math.inf
    return float(np.median(tail))


def recommend(trials: list[Trial]) -> tuple[Trial | None, str]:
    """The TRAINABLE trial with the lowest loss at the end, and why; None if there is none."""
    trainable = [t for t in trials if t.verdict in TRAINABLE and math.isfinite(t.end_loss)]
    if not trainable:
        seen = ", ".join(sorted({t.verdict for t in trials}))
        return None, (
            f"no trial trained without exploding, oscillating or stalling ({seen}): widen the "
            "grid (--lrs), lengthen --trial_steps or look at lr_sweep.png"
        )
    best = min(trainable, key=lambda t: t.end_loss)
    reason = (
        f"the lowest loss at the end ({best.end_loss:.4g}) of the {len(trainable)} trials that "
        "neither exploded, oscillated nor stalled"
    )
    above = [t for t in trials if t.base_lr > best.base_lr and t.verdict not in TRAINABLE]
    if above:
        reason += f"; from lr.base {min(t.base_lr for t in above):.4g} up: " + ", ".join(
            sorted({t.verdict for t in above})
        )
    return best, reason


def _grid(directory: str, requested: list[float], trial_steps: int) -> dict:
    """The sweep's grid: fixed by its first run, so a rerun resumes the same trials."""
    path = os.path.join(directory, GRID_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            saved = json.load(f)
        if requested and sorted(requested) != saved["base_lrs"]:
            raise ConfigError(
                f"{directory} holds a sweep of lr.base {saved['base_lrs']}: rerun without --lrs "
                "to continue it, or use another --workdir for another grid"
            )
        return saved
    grid = {"base_lrs": sorted(requested), "trial_steps": trial_steps}
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(grid, f)
    return grid


def _run_trial(
    config: ml_collections.ConfigDict,
    base_lr: float,
    grid: dict,
    peak_per_base: float,
    workdir: str,
) -> Trial:
    """Runs (or resumes) one trial, unless it finished before; returns its Trial.

    `peak_per_base` is the peak LR of lr.base 1 at the run's global batch (its scaling rule)."""
    path = os.path.join(workdir, TRIAL_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            return Trial(**json.load(f))
    trial = trial_config(config, base_lr, grid["trial_steps"])
    logging.info(
        "lr_sweep | trial lr.base=%.4g | %d updates | %s", base_lr, trial.total_steps, workdir
    )
    eval_metrics = {}
    try:
        eval_metrics = train.train_and_evaluate(trial, workdir)
    except NonFiniteLossError as error:  # nan_policy=fail ends the trial: it exploded.
        logging.warning("lr_sweep | trial lr.base=%.4g stopped: %s", base_lr, error)
    summary = report.summarize(workdir)
    result = Trial(
        base_lr=base_lr,
        peak_lr=base_lr * peak_per_base,
        verdict="explodes" if not eval_metrics else summary["verdict"],
        end_loss=end_loss(metrics.read_steps(workdir)["loss"]),
        eval_metrics={k: float(v) for k, v in eval_metrics.items()},
        events=[event["message"] for event in summary["events"]],
        workdir=workdir,
    )
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=1)
    return result


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    base_lrs: list[float] | None = None,
    factors: list[float] = (),
    trial_steps: int = 0,
    range_test: dict | None = None,
) -> Sweep:
    """Runs the sweep in WORKDIR/lr_sweep/ (resuming one started there) and writes its report.

    `base_lrs` are the values of lr.base to try; without them, `factors` x the range test's
    suggested lr.base (`range_test`: lr_find.run's keyword arguments; it runs only when the
    sweep starts, not when it resumes).
    """
    directory = os.path.join(workdir, DIRECTORY)
    setup = setup_lib.prepare(config)
    plan = setup.plan
    if trial_steps <= 0:
        trial_steps = default_trial_steps(
            plan.warmup_steps, plan.total_steps, config.health.trend_window
        )
    if trial_steps <= plan.warmup_steps:
        raise ConfigError(
            f"--trial_steps ({trial_steps}) must exceed the warmup ({plan.warmup_steps} steps): "
            "a trial must reach its peak LR to be judged"
        )
    if not base_lrs and not tf.io.gfile.exists(os.path.join(directory, GRID_FILE)):
        found = lr_find.run(config, workdir, **(range_test or {}))
        if found.suggested_base_lr is None:
            raise UserError(
                "the LR range test found no LR at which the loss falls (see "
                f"{workdir}/lr_find/lr_find.png): pass the grid yourself with --lrs"
            )
        base_lrs = [found.suggested_base_lr * factor for factor in factors]
    if any(not (math.isfinite(lr) and lr > 0) for lr in base_lrs or ()):
        raise ConfigError(f"--lrs ({base_lrs}) must all be positive numbers")
    grid = _grid(directory, [float(f"{lr:.4g}") for lr in base_lrs or ()], trial_steps)
    peak_per_base = plan.peak_lr / plan.base_lr  # The scaling rule at this global batch.
    trials = [
        _run_trial(
            config, lr, grid, peak_per_base, os.path.join(directory, "trials", f"lr_base_{lr:.4g}")
        )
        for lr in grid["base_lrs"]
    ]
    recommended, reason = recommend(trials)
    sweep = Sweep(trials, grid["trial_steps"], recommended, reason)
    if setup.topology.is_chief:
        _write(sweep, directory)
    return sweep


def _table(sweep: Sweep) -> str:
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


def _write(sweep: Sweep, directory: str) -> None:
    with tf.io.gfile.GFile(os.path.join(directory, "lr_sweep.json"), "w") as f:
        json.dump(
            {
                "trials": [dataclasses.asdict(t) for t in sweep.trials],
                "trial_steps": sweep.trial_steps,
                "recommended_base_lr": sweep.recommended and sweep.recommended.base_lr,
                "recommended_peak_lr": sweep.recommended and sweep.recommended.peak_lr,
                "reason": sweep.reason,
            },
            f,
            indent=1,
        )
    with tf.io.gfile.GFile(os.path.join(directory, "lr_sweep.md"), "w") as f:
        f.write(_table(sweep))
    with plotting.png(os.path.join(directory, "lr_sweep.png"), (8, 4.5)) as axes:
        for t in sweep.trials:
            losses = metrics.read_steps(t.workdir)["loss"]
            finite = np.where(np.isfinite(losses), losses, np.nan)
            reading = sweep.reading(t)
            axes.plot(
                np.arange(1, len(losses) + 1),
                lr_find.smooth(list(np.nan_to_num(finite, nan=np.nanmax(finite, initial=1.0)))),
                color=READINGS[reading],
                linewidth=2.5 if t is sweep.recommended else 1.0,
                label=f"lr.base {t.base_lr:.3g}: {reading}",
            )
        axes.set_yscale("log")
        axes.set_xlabel("update")
        axes.set_ylabel("train loss (smoothed)")
        axes.set_title(f"LR sweep, {sweep.trial_steps} updates per trial")
        axes.legend(fontsize=8)


def main(argv: list[str]) -> None:
    del argv
    sweep = run(
        cli.CONFIG.value,
        cli.WORKDIR.value,
        base_lrs=[float(lr) for lr in _LRS.value],
        factors=[float(f) for f in _FACTORS.value],
        trial_steps=_TRIAL_STEPS.value,
        range_test={
            "min_lr": lr_find.MIN_LR.value,
            "max_lr": lr_find.MAX_LR.value,
            "num_steps": lr_find.NUM_STEPS.value,
            "rule": lr_find.RULE.value,
        },
    )
    written = os.path.join(cli.WORKDIR.value, DIRECTORY)
    for t in sweep.trials:
        logging.info(
            "lr_sweep | lr.base %.4g | %s | loss at the end %.4g",
            t.base_lr,
            sweep.reading(t),
            t.end_loss,
        )
    if sweep.recommended is None:
        logging.warning("lr_sweep | %s | wrote %s", sweep.reason, written)
        return
    logging.info(
        "lr_sweep | recommended lr.base: %.4g (peak lr %.4g at this global batch; "
        "python -m trainer.plan gives it for another topology): %s | wrote %s",
        sweep.recommended.base_lr,
        sweep.recommended.peak_lr,
        sweep.reason,
        written,
    )


if __name__ == "__main__":
    cli.run(main, "config", "workdir")

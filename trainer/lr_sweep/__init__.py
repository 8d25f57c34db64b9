"""A short stability sweep: trials at a grid of LRs, each judged by the health rules; a pick.

Each trial is the configured run compressed to `trial_steps` updates: the same model, data,
strategy and warmup (in updates), the decay squeezed into the trial (cosine, linear and
polynomial end with the trial; piecewise boundaries and exponential decay_steps scale with it),
trained by the real trainer in its own workdir under WORKDIR/lr_sweep/trials/. The grid is given
(values of lr.base) or is a set of factors around the LR range test's suggestion
(`trainer.lr_find`: its WORKDIR/lr_find/lr_find.json when one is there, else it runs first).
Every trial gets the verdict of `health.classify` on the monitor's events (explodes, oscillates,
stalls, spikes, healthy) and its loss at the end; the recommendation is the trial that ended
lowest of those that did not explode, oscillate or stall. Below it in LR, trials that trained or
stalled are "too slow". `report.write` puts lr_sweep.json, lr_sweep.md (the table) and
lr_sweep.png into WORKDIR/lr_sweep/; the run's own files in WORKDIR are never touched.

Stopping is cheap: a finished trial is never rerun, an unfinished one resumes from its last
checkpoint, and rerunning continues the same grid (grid.json), refusing a changed grid, trial
length or config. The recommendation is given as the peak LR at this run's global batch and as
the `lr.base` at `lr.reference_batch_size`, which `python -m trainer.plan` turns into the LR of
any other topology. A sweep runs on one worker (multi-worker runs are refused).
"""

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import checkpointing, learning_rate, lr_find, metrics, train
from trainer import plan as plan_lib
from trainer import setup as setup_lib
from trainer.errors import ConfigError, UserError
from trainer.health import report as health_report
from trainer.lr_sweep import report
from trainer.recovery import NonFiniteLossError

DIRECTORY = "lr_sweep"
GRID_FILE = "grid.json"  # The grid, trial length and config, fixed when the sweep starts.
TRIAL_FILE = "trial.json"  # In a trial's workdir once it finished: its result.
DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
# The verdicts a recommendation may have: isolated spikes that the run survived are no reason
# to pass over the LR that trained best.
TRAINABLE = ("healthy", "spikes")
END_FRACTION = 0.1  # "The loss at the end": the median over the trial's last 10% of updates.


@dataclasses.dataclass(frozen=True)
class Trial:
    base_lr: float  # lr.base
    peak_lr: float  # At this run's global batch.
    verdict: str  # health.VERDICTS
    end_loss: float  # inf when the trial ended on a non-finite loss (null in JSON).
    eval_metrics: dict[str, float]  # The last eval; {} when the trial stopped before it.
    events: list[str]  # The health events' messages.
    workdir: str

    def to_json(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["end_loss"] = self.end_loss if math.isfinite(self.end_loss) else None
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> "Trial":
        return cls(
            **{**fields, "end_loss": math.inf if fields["end_loss"] is None else fields["end_loss"]}
        )


@dataclasses.dataclass(frozen=True)
class Sweep:
    trials: list[Trial]
    trial_steps: int
    recommended: Trial | None
    reason: str

    def reading(self, trial: Trial) -> str:
        """The trial's line in the table: its verdict, or where it stands next to the pick.

        Below the recommended LR, a trial that trained or stalled is "too slow"."""
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
    config: ml_collections.ConfigDict, plan: plan_lib.Plan, base_lr: float, trial_steps: int
) -> ml_collections.ConfigDict:
    """The run `config` describes (planned as `plan`), at lr.base = `base_lr`, compressed to
    `trial_steps` updates.

    The warmup keeps its length in updates; the decay after it shrinks by (trial_steps -
    warmup) / (planned total - warmup), piecewise boundaries and exponential decay_steps too.
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
    learning_rate.compress(trial.lr, plan, trial_steps)  # The schedule knows its own kinds.
    trial.checkpoint_every_steps = min(config.checkpoint_every_steps, trial_steps)
    trial.lr.milestones = ()
    trial.lr.milestone_values = ()
    trial.lr.plateau_metric = ""
    trial.nan_policy = "fail"
    trial.health.action = "warn"
    trial.export_at_end = False
    trial.best_metric = ""
    trial.profile_steps = ()
    trial = ml_collections.ConfigDict(trial.to_dict(), type_safe=True)
    trial.lock()
    return trial


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


@dataclasses.dataclass(frozen=True)
class Grid:
    """What a sweep was started with; a rerun must ask for the same."""

    base_lrs: list[float]
    trial_steps: int
    config: dict  # The run's config, flattened.
    factors: list[float] | None = None  # What made base_lrs around the range test; None: --lrs.


def _start_or_continue(directory: str, grid: Grid, explicit: bool) -> Grid:
    """The sweep's grid: written when it starts, so a rerun resumes the same trials. A rerun
    that asks for other LRs (`explicit`), other factors (of a sweep started from factors),
    another trial length or another config is refused. The range test is not repeated: its
    suggestion, read when the sweep started, is in the saved grid."""
    path = os.path.join(directory, GRID_FILE)
    if not tf.io.gfile.exists(path):
        tf.io.gfile.makedirs(directory)
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(dataclasses.asdict(grid), f, indent=1)
        return grid
    with tf.io.gfile.GFile(path) as f:
        saved = Grid(**json.load(f))
    changed = sorted(
        name
        for name in set(saved.config) | set(grid.config)
        if saved.config.get(name) != grid.config.get(name)
    )
    if explicit and grid.base_lrs != saved.base_lrs:
        changed.insert(0, f"--lrs (started with {saved.base_lrs})")
    if not explicit and saved.factors is not None and grid.factors != saved.factors:
        changed.insert(0, f"--factors (started with {saved.factors})")
    if grid.trial_steps != saved.trial_steps:
        changed.insert(0, f"--trial_steps (started with {saved.trial_steps})")
    if changed:
        raise ConfigError(
            f"{directory} holds a sweep started with other settings ({', '.join(changed)}): "
            "rerun it as it was started to continue it, or use another --workdir"
        )
    return saved


def _final_eval(workdir: str) -> dict[str, float]:
    """The trial's last eval record (also when it had finished before this process)."""
    evals = [r for r in metrics.read_records(workdir) if "eval_loss" in r]
    if not evals:
        return {}
    return {k: float(v) for k, v in evals[-1].items() if "eval_" in k}


def _run_trial(trial: ml_collections.ConfigDict, peak_lr: float, workdir: str) -> Trial:
    """Runs (or resumes) one trial, unless it finished before; returns its Trial."""
    path = os.path.join(workdir, TRIAL_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            return Trial.from_json(json.load(f))
    logging.info(
        "lr_sweep | trial lr.base=%.4g | %d updates | %s", trial.lr.base, trial.total_steps, workdir
    )
    exploded = False
    try:
        train.train_and_evaluate(trial, workdir)
    except NonFiniteLossError as error:  # nan_policy=fail ends the trial: it exploded.
        logging.warning("lr_sweep | trial lr.base=%.4g stopped: %s", trial.lr.base, error)
        exploded = True
    summary = health_report.summarize(workdir)
    result = Trial(
        base_lr=trial.lr.base,
        peak_lr=peak_lr,
        verdict="explodes" if exploded else summary["verdict"],
        end_loss=end_loss(metrics.read_steps(workdir)["loss"]),
        eval_metrics=_final_eval(workdir),
        events=[event["message"] for event in summary["events"]],
        workdir=workdir,
    )
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(result.to_json(), f, indent=1)
    return result


def _centre(config: ml_collections.ConfigDict, workdir: str, range_test: dict) -> float:
    """The range test's suggested lr.base: from WORKDIR/lr_find/ if a range test is there (the
    README's step 1), else from one run now."""
    path = os.path.join(workdir, "lr_find", "lr_find.json")
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            suggested = json.load(f)["suggested_base_lr"]
        logging.info("lr_sweep | the range test in %s suggests lr.base %s", path, suggested)
    else:
        suggested = lr_find.run(config, workdir, **range_test).suggested_base_lr
    if suggested is None:
        raise UserError(
            "the LR range test found no LR at which the loss falls (see "
            f"{workdir}/lr_find/lr_find.png): pass the grid yourself with --lrs"
        )
    return suggested


def _check_trial(trial: ml_collections.ConfigDict, plan: plan_lib.Plan) -> None:
    """Raises the ConfigError a trial would raise in its first seconds, before anything runs
    (e.g. piecewise boundaries that land inside the warmup of a short trial)."""
    trial_plan = plan_lib.make_plan(
        trial, num_replicas=plan.num_replicas, num_workers=1, train_examples=plan.train_examples
    )
    learning_rate.base_schedule(trial_plan, trial.lr)


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    base_lrs: list[float] = (),
    factors: tuple[float, ...] = DEFAULT_FACTORS,
    trial_steps: int = 0,
    range_test: dict | None = None,
) -> Sweep:
    """Runs the sweep in WORKDIR/lr_sweep/ (continuing one started there) and writes its report.

    `base_lrs` are the values of lr.base to try (rounded to 4 significant digits, which name the
    trials' workdirs); without them, `factors` x the range test's suggested lr.base, the range
    test (`range_test`: lr_find.run's keyword arguments, its defaults when None) running only
    when neither WORKDIR/lr_find/ nor a started sweep is there. `trial_steps` 0 =
    `default_trial_steps`.
    """
    directory = os.path.join(workdir, DIRECTORY)
    # Before `prepare`, which would wait for the other workers (the only strategy with several;
    # a TPU slice has one client).
    if config.distribution.strategy == "multi_worker":
        raise ConfigError(
            "lr_sweep runs on one worker: sweep on one host (mirrored or tpu), then carry the "
            "lr.base it recommends to the multi-worker run (python -m trainer.plan shows its LR)"
        )
    plan = setup_lib.prepare(config).plan
    window = config.health.trend_window
    trial_steps = trial_steps or default_trial_steps(plan.warmup_steps, plan.total_steps, window)
    if trial_steps < plan.warmup_steps + window:
        raise ConfigError(
            f"--trial_steps ({trial_steps}) must be at least the warmup ({plan.warmup_steps}) plus "
            f"health.trend_window ({window}): the stall and oscillation rules judge that many "
            "updates after the peak; 0 gives the default"
        )
    started = tf.io.gfile.exists(os.path.join(directory, GRID_FILE))
    from_factors = not base_lrs
    if from_factors and not started:
        centre = _centre(config, workdir, range_test or {})
        base_lrs = [centre * f for f in factors]
    if any(not (math.isfinite(lr) and lr > 0) for lr in base_lrs):
        raise ConfigError(f"the grid of lr.base ({list(base_lrs)}) must be positive numbers")
    requested = sorted({float(f"{lr:.4g}") for lr in base_lrs})
    if not requested and not started:
        raise ConfigError("the grid is empty: pass --lrs, or --factors around the range test")
    _check_trial(trial_config(config, plan, 1.0, trial_steps), plan)
    flat_config = checkpointing.flatten_config(json.loads(config.to_json()))
    asked = Grid(requested, trial_steps, flat_config, list(factors) if from_factors else None)
    grid = _start_or_continue(directory, asked, explicit=not from_factors)
    trials = []
    for lr in grid.base_lrs:
        trial = trial_config(config, plan, lr, grid.trial_steps)
        workdir_of_trial = os.path.join(directory, "trials", f"lr_base_{lr:.4g}")
        trials.append(_run_trial(trial, lr * plan.lr_scale, workdir_of_trial))
    recommended, reason = recommend(trials)
    sweep = Sweep(trials, grid.trial_steps, recommended, reason)
    report.write(sweep, directory)
    return sweep

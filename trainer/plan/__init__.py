"""The run plan: every derived number, computed once from the config and the topology.

Preview a run without training, for any topology: `python -m trainer.plan` (see __main__.py).
"""

import dataclasses
import math
import numbers

import ml_collections

from trainer import learning_rate, plotting
from trainer.errors import ConfigError

UNITS = ("steps", "epochs", "examples")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Resolved numbers; stored with every checkpoint and compared on resume."""

    num_replicas: int
    num_workers: int
    global_batch_size: int  # Examples per optimizer update: what steps, epochs and the LR use.
    accumulation_steps: int  # Micro-batches whose gradients are summed into one update.
    micro_batch_size: int  # Examples per forward/backward pass, all replicas together.
    per_replica_batch_size: int  # Examples per forward/backward pass on one replica.
    train_examples: int
    steps_per_epoch: float
    total_steps: int
    warmup_steps: int
    base_lr: float
    reference_batch_size: int
    lr_scaling: str
    peak_lr: float
    boundaries: tuple[int, ...]  # piecewise decay, in steps
    milestones: tuple[int, ...]  # lr_control milestones, in steps

    @property
    def lr_scale(self) -> float:
        """The peak LR per unit of lr.base at this global batch: the scaling rule's factor, for
        tools that report an LR both ways (lr_find, lr_sweep)."""
        return self.peak_lr / self.base_lr

    def summary(self) -> str:
        """The one start-up line with the numbers people get wrong."""
        return (
            f"plan | replicas: {self.num_replicas} (workers: {self.num_workers}) | "
            f"global batch: {self.global_batch_size} | per-replica batch: "
            f"{self.per_replica_batch_size} | accumulation steps: {self.accumulation_steps} | "
            f"steps/epoch: {self.steps_per_epoch:.2f} | "
            f"peak lr: {self.peak_lr:.6g} ({self.lr_scaling} from {self.base_lr:g} @ "
            f"{self.reference_batch_size}) | warmup steps: {self.warmup_steps} | "
            f"total steps: {self.total_steps}"
        )


def _to_steps(value: float, unit: str, field: str, plan_facts: tuple[float, int]) -> int:
    """Converts a duration to optimizer steps, the only unit the training code deals with."""
    steps_per_epoch, global_batch_size = plan_facts
    if unit not in UNITS:
        raise ConfigError(f"{field} unit ({unit!r}) is not one of {', '.join(UNITS)}")
    if unit == "epochs":
        return int(round(value * steps_per_epoch))
    if unit == "examples":
        return int(round(value / global_batch_size))
    return int(value)


def _duration(config: ml_collections.ConfigDict, prefix: str, plan_facts: tuple[float, int]) -> int:
    """Reads `{prefix}_steps`, overridden by `{prefix}_epochs`/`{prefix}_examples` when set."""
    given = [u for u in ("epochs", "examples") if config.get(f"{prefix}_{u}") is not None]
    if len(given) > 1:
        raise ConfigError(
            f"both {prefix}_epochs and {prefix}_examples are set; give the duration in one unit"
        )
    unit = given[0] if given else "steps"
    return _to_steps(config[f"{prefix}_{unit}"], unit, f"{prefix}_{unit}", plan_facts)


def _check_positive(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = config[field]
        if value is not None and value <= 0:
            raise ConfigError(f"{field} ({value}) must be positive")


def _check_finite(config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Rejects nan and inf in every number of the config, sequences included, wherever it is
    read: `round(nan)` fails with a bare ValueError, `nan > 0` is False so range checks pass it
    by, and an inf duration or factor gives a run that never ends or never learns."""
    for key, value in config.items():
        field = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite(value, f"{field}.")
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, numbers.Real) and not math.isfinite(v) for v in values):
            raise ConfigError(
                f"{field} ({value}) must be a finite number, not nan or inf; set a finite value "
                "(the defaults are in configs/default.py)"
            )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Rejects the plan's own fields (sizes, durations, cadences) and any nan/inf in the config,
    whatever the topology, naming the field and the fix; `config_check.check_config` runs it with
    every other module's check, once, before anything is written."""
    _check_finite(config)
    _check_positive(
        config,
        "global_batch_size",
        "accumulation_steps",
        "total_steps",
        "total_epochs",
        "total_examples",
        "steps_per_loop",
        "log_every_steps",
        "eval_every_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
    )


def make_plan(
    config: ml_collections.ConfigDict, *, num_replicas: int, num_workers: int, train_examples: int
) -> Plan:
    """Resolves a checked config (`config_check.check_config`) for a topology.

    Raises:
      ConfigError: what depends on the topology (the batch split) or the dataset's size (a run
        of no steps), naming the field, the value and the fix.
    """
    global_batch_size, accumulation_steps = config.global_batch_size, config.accumulation_steps
    micro_batches = num_replicas * accumulation_steps  # Per-replica micro-batches per update.
    if global_batch_size % micro_batches:
        times_k = f" x {accumulation_steps} accumulation_steps" if accumulation_steps > 1 else ""
        raise ConfigError(
            f"global_batch_size ({global_batch_size}) is not divisible by the {num_replicas} "
            f"replicas{times_k}; use a multiple of {micro_batches}"
        )
    steps_per_epoch = train_examples / global_batch_size
    facts = (steps_per_epoch, global_batch_size)
    total_steps = _duration(config, "total", facts)
    warmup_steps = _duration(config.lr, "warmup", facts)
    if total_steps <= 0:
        raise ConfigError(f"the run is {total_steps} steps long; raise total_steps/total_epochs")
    lr = config.lr
    boundaries = tuple(
        _to_steps(b, lr.boundaries_unit, "lr.boundaries", facts) for b in lr.boundaries
    )
    milestones = tuple(
        _to_steps(m, lr.milestones_unit, "lr.milestones", facts) for m in lr.milestones
    )
    plan = Plan(
        num_replicas=num_replicas,
        num_workers=num_workers,
        global_batch_size=global_batch_size,
        accumulation_steps=accumulation_steps,
        micro_batch_size=global_batch_size // accumulation_steps,
        per_replica_batch_size=global_batch_size // micro_batches,
        train_examples=train_examples,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        base_lr=lr.base,
        reference_batch_size=lr.reference_batch_size,
        lr_scaling=lr.scaling,
        peak_lr=learning_rate.scale_learning_rate(
            lr.base, lr.reference_batch_size, global_batch_size, lr.scaling
        ),
        boundaries=boundaries,
        milestones=milestones,
    )
    return plan


def key_steps(plan: Plan) -> list[int]:
    """Steps worth printing the LR at: start, end of warmup, boundaries, milestones, end."""
    steps = {1, max(plan.warmup_steps, 1), plan.total_steps // 2, plan.total_steps}
    steps.update(plan.boundaries, (b + 1 for b in plan.boundaries), plan.milestones)
    return sorted(s for s in steps if 1 <= s <= plan.total_steps)


def describe(plan: Plan, lr: ml_collections.ConfigDict) -> str:
    """The plan plus the LR at key steps, as printed by `python -m trainer.plan`."""
    curve = learning_rate.planned_curve(plan, lr)
    lines = [plan.summary(), "step | epoch | learning rate"]
    for step in key_steps(plan):
        lines.append(f"{step} | {step / plan.steps_per_epoch:.2f} | {curve[step - 1]:.6g}")
    if plan.milestones:
        lines.append(f"milestones (steps, applied by lr_control): {list(plan.milestones)}")
    return "\n".join(lines)


def plot(plan: Plan, lr: ml_collections.ConfigDict, path: str) -> None:
    """Writes a PNG of the whole LR curve."""
    with plotting.png(path) as axes:
        axes.plot(range(1, plan.total_steps + 1), learning_rate.planned_curve(plan, lr))
        axes.set_xlabel("step")
        axes.set_ylabel("learning rate")
        axes.set_title(
            f"{lr.warmup} warmup {plan.warmup_steps} + {lr.decay}, peak {plan.peak_lr:.4g}, "
            f"global batch {plan.global_batch_size}"
        )
        axes.grid(alpha=0.3)

"""The learning rate, in one place: scaling with the batch, warmup + decay, and the controlled
schedule the optimizer owns.

How `lr.base` becomes the LR of an update (the whole path):
  1. `plan.make_plan` scales it to the real global batch: `peak_lr = scale_learning_rate(...)`.
  2. `base_schedule(plan, lr)` is the warmup + decay curve over the plan's steps.
  3. `controlled_schedule(base)` wraps it as LR(step) = multiplier x base(max(step + step_offset,
     floor)), with `LRState` (checkpointed) holding multiplier, step_offset and floor. The
     optimizer is built with it (`optimizers.build_optimizer`) and so owns the LR: Keras calls
     it with `optimizer.iterations` inside every update, on every replica and host.
  4. `loop.py` reads `optimizer.learning_rate` inside the update: the value that was applied.
Mid-run changes (milestones, plateau, manual override, NaN recovery; decided in `lr_control.py`)
only ever write `LRState`, between inner loops: Keras 3 refuses to assign the LR of a
schedule-built optimizer, and swapping a float LR for a schedule breaks checkpoints.
"""

import itertools
import math
from collections.abc import Sequence

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError

SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_KINDS = ("linear", "exponential", "constant")
DECAY_KINDS = ("constant", "cosine", "linear", "polynomial", "piecewise", "rsqrt", "exponential")
MILESTONE_ACTIONS = ("multiply", "set")
PLATEAU_MODES = ("min", "max")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_kind(field: str, value: str, valid: tuple[str, ...]) -> None:
    _require(value in valid, f"{field} ({value!r}) is not one of {', '.join(valid)}")


def _check_finite(field: str, value: float) -> None:
    _require(
        isinstance(value, (int, float)) and math.isfinite(value),
        f"{field} ({value}) must be a finite number",
    )


def check_config(lr: ml_collections.ConfigDict) -> None:
    """Validates the `lr` fields that are not arguments of `WarmupDecaySchedule` (it checks its
    own), so every field is checked exactly once, at start-up, naming the field and the fix."""
    for field in (
        "base",
        "reference_batch_size",
        "plateau_factor",
        "plateau_min_delta",
        "plateau_min_lr",
    ):
        _check_finite(f"lr.{field}", lr[field])
    _require(lr.base > 0, f"lr.base ({lr.base}) must be positive")
    _require(
        lr.reference_batch_size > 0,
        f"lr.reference_batch_size ({lr.reference_batch_size}) must be positive",
    )
    _check_kind("lr.scaling", lr.scaling, SCALING_RULES)
    _check_kind("lr.milestone_action", lr.milestone_action, MILESTONE_ACTIONS)
    _check_kind("lr.plateau_mode", lr.plateau_mode, PLATEAU_MODES)
    _require(
        len(lr.milestones) == len(lr.milestone_values),
        f"lr.milestones ({lr.milestones}) and lr.milestone_values ({lr.milestone_values}) need "
        "one value per milestone",
    )
    _require(
        list(lr.milestones) == sorted(set(lr.milestones)),
        f"lr.milestones ({lr.milestones}) must be strictly increasing",
    )
    for value in lr.milestone_values:
        _check_finite("lr.milestone_values", value)
        _require(value > 0, f"lr.milestone_values ({lr.milestone_values}) must be positive")
    _require(
        0 < lr.plateau_factor < 1, f"lr.plateau_factor ({lr.plateau_factor}) must be in (0, 1)"
    )


def scale_learning_rate(
    base_lr: float, reference_batch_size: int, global_batch_size: int, rule: str
) -> float:
    """Returns the peak LR for `global_batch_size`, given `base_lr` tuned at the reference batch.

    A recipe's LR is only valid for the batch it was tuned at; scaling it keeps the update size
    per example roughly constant when the batch grows with the number of replicas.
    linear: base * B / ref, for SGD (Goyal et al. 2017, "ImageNet in 1 hour").
    sqrt: base * sqrt(B / ref), for Adam-type optimizers, whose updates are already normalised.
    none: base, for recipes whose LR was tuned at the batch actually used.
    The arguments are validated once, by `check_config` and the plan.
    """
    ratio = global_batch_size / reference_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


@keras.saving.register_keras_serializable(package="tfscale")
class WarmupDecaySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Warmup to `peak_lr`, then decay; one class so every recipe is a config change, not code.

    Keras calls a schedule with `optimizer.iterations`, the number of updates already applied, so
    the update being applied is number u = step + 1 (1-based). All formulas use u: update number
    `warmup_steps` is the first to use exactly the peak LR, and the first update never uses LR 0.

    1. Warmup, for u <= warmup_steps (none if warmup_steps == 0); with
       start = peak * warmup_start_fraction:
       linear: start + (peak - start) * u / warmup_steps.
       exponential ("gradual"): peak * warmup_start_fraction ** (1 - u / warmup_steps).
       constant: start, then the peak from update warmup_steps + 1 on (Goyal et al.'s "constant
       warmup": the unscaled LR, warmup_start_fraction = 1 / k, for the first epochs).
    2. Decay, for u > warmup_steps; t = clip((u - warmup_steps) / (total_steps - warmup_steps),
       0, 1) and floor = peak * end_fraction:
       constant: peak.
       cosine: floor + (peak - floor) * 0.5 * (1 + cos(pi * t)).
       linear: peak + (floor - peak) * t.
       polynomial: floor + (peak - floor) * (1 - t) ** power.
       piecewise: peak * multipliers[i] once u > boundaries[i] (steps; peak before the first).
       rsqrt: peak * sqrt(max(warmup_steps, 1) / max(u, warmup_steps, 1)) (Transformer decay).
       exponential: max(floor, peak * decay_rate ** ((u - warmup_steps) / decay_steps)).

    `__call__` uses only float32 TF ops with no branching on tensor values, so it traces once
    inside `tf.function`, runs in replica context and on TPU, and also accepts a vector of
    steps eagerly: `schedule(np.arange(n))` is the whole curve, for plots.
    """

    def __init__(
        self,
        *,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_kind: str = "linear",
        warmup_start_fraction: float = 0.0,
        decay_kind: str = "constant",
        end_fraction: float = 0.0,
        power: float = 1.0,
        boundaries: Sequence[int] = (),
        multipliers: Sequence[float] = (),
        decay_rate: float = 0.5,
        decay_steps: int = 1,
    ):
        super().__init__()
        _check_kind("lr.warmup", warmup_kind, WARMUP_KINDS)
        _check_kind("lr.decay", decay_kind, DECAY_KINDS)
        _require(peak_lr > 0, f"peak_lr ({peak_lr}) must be positive; check lr.base, lr.scaling")
        _require(total_steps > 0, f"total_steps ({total_steps}) must be positive; train longer")
        _require(warmup_steps >= 0, f"lr.warmup_steps ({warmup_steps}) must be >= 0; 0 = none")
        _require(
            warmup_steps < total_steps,
            f"lr.warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps});"
            " shorten the warmup or train longer",
        )
        _require(
            0 <= warmup_start_fraction <= 1,
            f"lr.warmup_start_fraction ({warmup_start_fraction}) must be in [0, 1]",
        )
        _require(
            warmup_kind not in ("exponential", "constant") or warmup_start_fraction > 0,
            f"lr.warmup_start_fraction ({warmup_start_fraction}) must be > 0 for"
            f" lr.warmup={warmup_kind!r} (the warmup LR is peak x it); use e.g. 0.01",
        )
        _require(
            0 <= end_fraction <= 1,
            f"lr.end_fraction ({end_fraction}) must be in [0, 1]; it is the floor x peak",
        )
        _require(power > 0, f"lr.power ({power}) must be positive; 1.0 is linear decay")
        _require(
            0 < decay_rate <= 1,
            f"lr.decay_rate ({decay_rate}) must be in (0, 1]; e.g. 0.5 halves the LR",
        )
        _require(decay_steps > 0, f"lr.decay_steps ({decay_steps}) must be positive")
        boundaries, multipliers = list(boundaries), list(multipliers)
        if decay_kind == "piecewise":
            _check_piecewise(boundaries, multipliers, warmup_steps, total_steps)
        self.peak_lr = float(peak_lr)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_kind = warmup_kind
        self.warmup_start_fraction = float(warmup_start_fraction)
        self.decay_kind = decay_kind
        self.end_fraction = float(end_fraction)
        self.power = float(power)
        self.boundaries = [int(b) for b in boundaries]
        self.multipliers = [float(m) for m in multipliers]
        self.decay_rate = float(decay_rate)
        self.decay_steps = decay_steps

    def __call__(self, step: tf.types.experimental.TensorLike) -> tf.Tensor:
        """Returns the float32 LR for the update after `step` (or each of a vector of steps)."""
        u = tf.cast(step, tf.float32) + 1.0  # The 1-based number of the update being applied.
        if self.warmup_steps == 0:
            return self._decay(u)
        # 3) Both phases are computed; tf.where picks per step, so nothing branches on tensors.
        return tf.where(u <= self.warmup_steps, self._warmup(u), self._decay(u))

    def _warmup(self, u: tf.Tensor) -> tf.Tensor:
        # 1) Warmup: ramp up to peak, reached exactly at update number warmup_steps.
        peak, fraction = self.peak_lr, u / self.warmup_steps
        start = peak * self.warmup_start_fraction
        if self.warmup_kind == "linear":
            return start + (peak - start) * fraction
        if self.warmup_kind == "constant":
            return tf.fill(tf.shape(u), start)
        return peak * tf.pow(self.warmup_start_fraction, 1.0 - fraction)

    def _decay(self, u: tf.Tensor) -> tf.Tensor:
        # 2) Decay: t runs from 0 at the end of warmup to 1 at total_steps, then stays there.
        peak, warmup, kind = self.peak_lr, float(self.warmup_steps), self.decay_kind
        floor = peak * self.end_fraction
        t = tf.clip_by_value((u - warmup) / (self.total_steps - warmup), 0.0, 1.0)
        if kind == "constant":
            return tf.fill(tf.shape(u), peak)
        if kind == "cosine":
            return floor + (peak - floor) * 0.5 * (1.0 + tf.cos(math.pi * t))
        if kind == "linear":
            return peak + (floor - peak) * t
        if kind == "polynomial":
            return floor + (peak - floor) * tf.pow(1.0 - t, self.power)
        if kind == "piecewise":
            # Select, not sum, the multipliers so each plateau is exactly peak * multiplier.
            lr = tf.fill(tf.shape(u), peak)
            for boundary, multiplier in zip(self.boundaries, self.multipliers, strict=True):
                lr = tf.where(u > boundary, peak * multiplier, lr)
            return lr
        if kind == "rsqrt":
            return peak * tf.sqrt(max(warmup, 1.0) / tf.maximum(u, max(warmup, 1.0)))
        return tf.maximum(floor, peak * tf.pow(self.decay_rate, (u - warmup) / self.decay_steps))

    def phase(self, update: int) -> str:
        """Where update number `update` (1-based, on this schedule's axis) is, in words: for
        advice that depends on it (health events)."""
        if update <= self.warmup_steps:
            return f"warmup step {update} of {self.warmup_steps}"
        after = update - self.warmup_steps
        if self.decay_kind == "constant" or after <= max(self.total_steps // 20, 1):
            return f"at the peak, {after} steps after warmup ended"
        done = 100 * after / max(self.total_steps - self.warmup_steps, 1)
        return f"{self.decay_kind} decay, {done:.0f}% through"

    def get_config(self) -> dict:
        """Returns the constructor arguments, so checkpointed optimizers rebuild the schedule."""
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_kind": self.warmup_kind,
            "warmup_start_fraction": self.warmup_start_fraction,
            "decay_kind": self.decay_kind,
            "end_fraction": self.end_fraction,
            "power": self.power,
            "boundaries": list(self.boundaries),
            "multipliers": list(self.multipliers),
            "decay_rate": self.decay_rate,
            "decay_steps": self.decay_steps,
        }


def _check_piecewise(
    boundaries: list[int], multipliers: list[float], warmup_steps: int, total_steps: int
) -> None:
    _require(
        0 < len(boundaries) == len(multipliers),
        f"lr.boundaries {tuple(boundaries)} and lr.multipliers {tuple(multipliers)} must be"
        " non-empty and of equal length for lr.decay='piecewise'; one multiplier per boundary",
    )
    _require(
        all(b < c for b, c in itertools.pairwise(boundaries)),
        f"lr.boundaries {tuple(boundaries)} must be strictly increasing; sort, drop duplicates",
    )
    _require(
        warmup_steps < boundaries[0] and boundaries[-1] <= total_steps,
        f"lr.boundaries {tuple(boundaries)} must lie in (lr.warmup_steps, total_steps] ="
        f" ({warmup_steps}, {total_steps}]; check the unit (steps vs epochs)",
    )


def base_schedule(plan, lr: ml_collections.ConfigDict) -> WarmupDecaySchedule:
    """The warmup + decay curve of `plan` (a `plan.Plan`), before any mid-run change."""
    return WarmupDecaySchedule(
        peak_lr=plan.peak_lr,
        total_steps=plan.total_steps,
        warmup_steps=plan.warmup_steps,
        warmup_kind=lr.warmup,
        warmup_start_fraction=lr.warmup_start_fraction,
        decay_kind=lr.decay,
        end_fraction=lr.end_fraction,
        power=lr.power,
        boundaries=plan.boundaries,
        multipliers=tuple(lr.multipliers),
        decay_rate=lr.decay_rate,
        decay_steps=lr.decay_steps,
    )


def compress(lr: ml_collections.ConfigDict, plan, total_steps: int) -> None:
    """Fits `lr` (a copy of the `lr` fields of the run `plan` describes) into a run of
    `total_steps` updates, for a short trial of the same schedule (lr_sweep).

    The warmup keeps its length in updates; the decay after it shrinks by (total_steps -
    warmup) / (planned total - warmup): cosine, linear and polynomial by ending at the new
    total_steps, piecewise boundaries and exponential decay_steps by this factor.
    """
    warmup = plan.warmup_steps
    shrink = (total_steps - warmup) / max(plan.total_steps - warmup, 1)
    lr.warmup_steps = warmup
    lr.warmup_epochs = None
    if lr.decay == "piecewise":
        lr.boundaries_unit = "steps"
        lr.boundaries = tuple(
            warmup + max(1, round((b - warmup) * shrink)) for b in plan.boundaries
        )
    lr.decay_steps = max(1, round(lr.decay_steps * shrink))


def planned_curve(plan, lr: ml_collections.ConfigDict) -> list[float]:
    """The base schedule's LR for updates 1..total_steps (without mid-run changes), for plots."""
    values = base_schedule(plan, lr)(np.arange(plan.total_steps))
    return [float(v) for v in np.asarray(values)]


class LRState(tf.Module):
    """The checkpointed part of the LR. Create under `strategy.scope()` (the update reads it).

    multiplier: product of every mid-run change (milestones, plateau, overrides, NaN recovery).
    step_offset: plan step minus optimizer step; nonzero only after the global batch changed on
      resume, so the schedule continues from the same number of examples seen. Derived from
      `examples_seen` after every restore, never trusted from a checkpoint of another plan.
    floor: the schedule is read at no earlier step than this; a `set` during warmup moves it to
      the warmup's end, so the LR holds the value set instead of ramping on past it.
    What decides the changes keeps its own state (extras/lr_control.py: plateau, milestones).
    """

    def __init__(self):
        super().__init__(name="lr_state")
        self.multiplier = tf.Variable(1.0, trainable=False, name="multiplier")
        self.step_offset = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_offset")
        self.floor = tf.Variable(0, dtype=tf.int64, trainable=False, name="floor")


class ControlledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The schedule the optimizer owns: LR(step) = multiplier x base(max(step + offset, floor)).

    Two variable reads and a max per update; traces once (the variables are captured, not
    Python numbers), so a change between inner loops never retraces the compiled step.
    """

    def __init__(self, base: WarmupDecaySchedule, state: LRState):
        self.base = base
        self.state = state

    def __call__(self, step):
        position = tf.maximum(tf.cast(step, tf.int64) + self.state.step_offset, self.state.floor)
        return self.state.multiplier * self.base(position)

    def plan_position(self, step: int) -> int:
        """Where on the base curve the update after `step` applied updates reads (host side)."""
        return max(step + int(self.state.step_offset.numpy()), int(self.state.floor.numpy()))

    # Mid-run changes, between inner loops (host side; a few scalar reads). Each returns the
    # one-line LR event for the logs: "lr: OLD -> NEW at step S (REASON)".

    def lr_at(self, step: int) -> float:
        """The LR the update after `step` applied updates will use."""
        return float(self(step).numpy())

    def scale(self, factor: float, step: int, reason: str) -> str:
        """Multiplies the current LR (and the rest of the schedule) by `factor`."""
        return self._set_multiplier(self.state.multiplier.numpy() * factor, step, reason)

    def set(self, value: float, step: int, reason: str) -> str:
        """Makes the next update use LR `value`; the rest of the schedule is scaled to match.

        During warmup the rest of the ramp is skipped (the LR holds `value` until the decay
        starts, then decays from it), so the LR never exceeds `value`: the user who says "set
        the LR to X" gets X now and nothing higher later.

        Raises:
          ConfigError: the schedule is 0 there, so there is nothing to scale from.
        """
        position = self.plan_position(step)
        warmup_end = self.base.warmup_steps - 1  # The schedule step of the first peak update.
        floor = warmup_end if position < warmup_end else None
        base_value = float(self.base(max(position, warmup_end)).numpy())
        if base_value <= 0:
            raise ConfigError(
                f"cannot set the LR to {value} at step {step}: the schedule is 0 there; "
                "use a multiplying action instead"
            )
        return self._set_multiplier(value / base_value, step, reason, floor)

    def _set_multiplier(
        self, value: float, step: int, reason: str, floor: int | None = None
    ) -> str:
        old_lr = self.lr_at(step)
        self.state.multiplier.assign(value)
        if floor is not None:
            self.state.floor.assign(floor)
        message = f"lr: {old_lr:.6g} -> {self.lr_at(step):.6g} at step {step} ({reason})"
        logging.info(message)
        return message

    def get_config(self) -> dict:
        # The variables live in the checkpoint; the config describes the base curve.
        return {"base": keras.saving.serialize_keras_object(self.base)}


def controlled_schedule(base: WarmupDecaySchedule) -> ControlledSchedule:
    """The schedule to build the optimizer with, and its fresh state (under `strategy.scope()`)."""
    return ControlledSchedule(base, LRState())

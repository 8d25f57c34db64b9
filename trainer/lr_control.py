"""Decides mid-run LR changes: milestones, reduce-on-plateau and the manual override file.

Every decision changes `learning_rate.LRState` (checkpointed) between inner loops and returns a
one-line event for the logs; the optimizer's schedule reads that state inside the next update.
"""

import ml_collections
from absl import logging

from trainer import learning_rate, lr_override
from trainer.errors import ConfigError


class LRController:
    """Decides multiplier changes at loop boundaries (host side, cheap: a few scalar reads)."""

    def __init__(
        self,
        *,
        config: ml_collections.ConfigDict,
        milestone_steps: tuple[int, ...],
        schedule: learning_rate.ControlledSchedule,
    ):
        self._config = config
        self._milestone_steps = milestone_steps
        self._schedule = schedule
        self._state = schedule.state

    def lr_at(self, step: int) -> float:
        """The LR the update after `step` applied updates will use."""
        return float(self._schedule(step).numpy())

    def _set_multiplier(
        self, value: float, step: int, reason: str, floor: int | None = None
    ) -> str:
        old_lr = self.lr_at(step)
        self._state.multiplier.assign(value)
        if floor is not None:
            self._state.floor.assign(floor)
        message = f"lr: {old_lr:.6g} -> {self.lr_at(step):.6g} at step {step} ({reason})"
        logging.info(message)
        return message

    def scale(self, factor: float, step: int, reason: str) -> str:
        """Multiplies the current LR (and the rest of the schedule) by `factor`."""
        return self._set_multiplier(self._state.multiplier.numpy() * factor, step, reason)

    def set(self, value: float, step: int, reason: str) -> str:
        """Makes the next update use LR `value`; the rest of the schedule is scaled to match.

        During warmup the rest of the ramp is skipped (the LR holds `value` until the decay
        starts, then decays from it), so the LR never exceeds `value`: the user who says "set
        the LR to X" gets X now and nothing higher later.
        """
        base = self._schedule.base
        position = self._schedule.plan_position(step)
        warmup_end = base.warmup_steps - 1  # The schedule step of the first update at the peak.
        floor = warmup_end if position < warmup_end else None
        position = max(position, warmup_end)
        base_value = float(base(position).numpy())
        if base_value <= 0:
            raise ConfigError(
                f"cannot set the LR to {value} at step {step}: the schedule is 0 there; "
                "use a multiplying action instead"
            )
        return self._set_multiplier(value / base_value, step, reason, floor)

    def next_milestone(self) -> int | None:
        """The step of the next pending milestone, so the outer loop can stop exactly there."""
        done = int(self._state.milestones_done.numpy())
        return self._milestone_steps[done] if done < len(self._milestone_steps) else None

    def on_loop_end(self, step: int) -> list[str]:
        """Applies every milestone reached after `step` updates (milestones are plan steps)."""
        plan_step = step + int(self._state.step_offset.numpy())
        events = []
        while (milestone := self.next_milestone()) is not None and plan_step >= milestone:
            index = int(self._state.milestones_done.numpy())
            value = self._config.milestone_values[index]
            reason = f"milestone {index + 1} at step {milestone}"
            if self._config.milestone_action == "set":
                events.append(self.set(value, step, reason))
            else:
                events.append(self.scale(value, step, reason))
            self._state.milestones_done.assign_add(1)
        return events

    def on_eval(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Reduce-on-plateau on `lr.plateau_metric`, Keras ReduceLROnPlateau semantics."""
        config = self._config
        if not config.plateau_metric:
            return []
        if config.plateau_metric not in metrics:
            raise ConfigError(
                f"lr.plateau_metric ({config.plateau_metric!r}) is not an eval metric; use one "
                f"of {', '.join(sorted(metrics))}"
            )
        value = metrics[config.plateau_metric]
        state = self._state
        best = float(state.plateau_best.numpy())
        if config.plateau_mode == "min":
            improved = value < best - config.plateau_min_delta
        else:
            improved = value > best + config.plateau_min_delta
        if state.plateau_cooldown.numpy() > 0:
            state.plateau_cooldown.assign_sub(1)
            state.plateau_wait.assign(0)
        if improved:
            state.plateau_best.assign(value)
            state.plateau_wait.assign(0)
            return []
        if state.plateau_cooldown.numpy() > 0:
            return []
        state.plateau_wait.assign_add(1)
        if state.plateau_wait.numpy() < config.plateau_patience:
            return []
        state.plateau_wait.assign(0)
        state.plateau_cooldown.assign(config.plateau_cooldown)
        current = self.lr_at(step)
        if current <= config.plateau_min_lr:
            return []
        factor = max(config.plateau_factor, config.plateau_min_lr / current)
        reason = f"{config.plateau_metric}={value:.6g} no better than {best:.6g} (plateau)"
        return [self.scale(factor, step, reason)]

    def apply_override(self, request: lr_override.Request, step: int) -> str:
        """Applies a manual override (read by `lr_override.take_pending`) to the next update.

        Raises ConfigError when a "set" cannot be applied (the schedule is 0 there).
        """
        reason = f"manual override {request}"
        if request.action == "multiply":
            return self.scale(request.value, step, reason)
        return self.set(request.value, step, reason)

"""Decides mid-run LR changes: milestones and reduce-on-plateau (and applies manual overrides).

Every decision changes the LR through the optimizer's schedule (`ControlledSchedule.scale` /
`set`, which write the checkpointed `learning_rate.LRState`) between inner loops and returns a
one-line event for the logs. What the decisions remember (plateau tracking, milestones applied)
is this module's own `ControllerState`, also checkpointed.
`LRControlAction` runs the controller at the outer loop's boundaries (trainer/actions.py).
"""

import ml_collections
import tensorflow as tf

from trainer import learning_rate, lr_override
from trainer.actions import Action, LoopResult
from trainer.errors import ConfigError


def check_plateau_metric(lr: ml_collections.ConfigDict, eval_names: tuple[str, ...]) -> None:
    """Checked at start-up, not at the first eval (possibly hours in), against what eval returns."""
    metric = lr.plateau_metric
    if metric and metric not in eval_names:
        raise ConfigError(
            f"lr.plateau_metric ({metric!r}) is not an eval metric of this run; use one of "
            f"{', '.join(eval_names)}, or '' for no reduce-on-plateau"
        )


class ControllerState(tf.Module):
    """The controller's checkpointed variables. Create under `strategy.scope()`.

    In every checkpoint of a copy that has this module (state.build_state), whether or not the
    config uses LR control, so turning milestones or reduce-on-plateau on or off on resume keeps
    the checkpoint's shape.
    """

    def __init__(self, plateau_mode: str):
        super().__init__(name="lr_control")
        initial_best = float("inf") if plateau_mode == "min" else float("-inf")
        # float64: a float32 best rounds e.g. 0.3 up, so an equal metric would count as better.
        self.plateau_best = tf.Variable(
            initial_best, dtype=tf.float64, trainable=False, name="plateau_best"
        )
        self.plateau_wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="plateau_wait")
        self.plateau_cooldown = tf.Variable(0, dtype=tf.int64, trainable=False, name="cooldown")
        self.milestones_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="milestones")


class LRController:
    """Decides multiplier changes at loop boundaries (host side, cheap: a few scalar reads)."""

    def __init__(
        self,
        *,
        config: ml_collections.ConfigDict,
        milestone_steps: tuple[int, ...],
        schedule: learning_rate.ControlledSchedule,
        state: ControllerState,
    ):
        self._config = config
        self._milestone_steps = milestone_steps
        self._schedule = schedule
        self._state = state

    def lr_at(self, step: int) -> float:
        """The LR the update after `step` applied updates will use."""
        return self._schedule.lr_at(step)

    def scale(self, factor: float, step: int, reason: str) -> str:
        return self._schedule.scale(factor, step, reason)

    def set(self, value: float, step: int, reason: str) -> str:
        return self._schedule.set(value, step, reason)

    def next_milestone(self) -> int | None:
        """The step of the next pending milestone, so the outer loop can stop exactly there."""
        done = int(self._state.milestones_done.numpy())
        return self._milestone_steps[done] if done < len(self._milestone_steps) else None

    def on_loop_end(self, step: int) -> list[str]:
        """Applies every milestone reached after `step` updates (milestones are plan steps)."""
        plan_step = step + int(self._schedule.state.step_offset.numpy())
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
        """Applies a manual override to the next update (see `lr_override.apply`)."""
        return lr_override.apply(request, self._schedule, step)


class LRControlAction(Action):
    """Milestones after each inner loop (the loop stops exactly at each), plateau after evals."""

    def __init__(self, controller: LRController):
        self.controller = controller

    @classmethod
    def from_run(cls, run) -> "LRControlAction":
        return cls(
            LRController(
                config=run.config.lr,
                milestone_steps=run.plan.milestones,
                schedule=run.schedule,
                state=run.state.lr_control,
            )
        )

    def next_stop(self, plan_step: int) -> int | None:
        del plan_step
        return self.controller.next_milestone()

    def after_train_loop(self, run, result: LoopResult) -> None:
        del result
        run.log_events(self.controller.on_loop_end(run.step))

    def after_eval(self, run, eval_metrics: dict[str, float]) -> None:
        run.log_events(self.controller.on_eval(run.step, eval_metrics))

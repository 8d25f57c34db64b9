"""Changes the LR during training on top of the schedule, with all of its state checkpointed.

Keras 3 refuses to assign the LR of an optimizer built with a schedule, and swapping a float LR
for a schedule breaks checkpoints (see BUILD_NOTES.md). So the optimizer is built once with
`ControlledSchedule`: LR(step) = multiplier x base_schedule(step + step_offset). Milestones,
reduce-on-plateau and the manual override only ever change `multiplier` between inner loops;
`step_offset` keeps the schedule position in examples when the global batch changes on resume.
Both are variables read inside the compiled step, so every replica applies the same value.
"""

import json
import math

import keras
import ml_collections
import tensorflow as tf
from absl import logging

OVERRIDE_FILE = "lr_override.json"


class LRState(tf.Module):
    """Checkpointed controller state. Create under `strategy.scope()` (the step reads it)."""

    def __init__(self, plateau_mode: str):
        super().__init__(name="lr_state")
        self.multiplier = tf.Variable(1.0, trainable=False, name="multiplier")
        self.step_offset = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_offset")
        initial_best = float("inf") if plateau_mode == "min" else float("-inf")
        # float64: a float32 best rounds e.g. 0.3 up, so an equal metric would count as better.
        self.plateau_best = tf.Variable(
            initial_best, dtype=tf.float64, trainable=False, name="plateau_best"
        )
        self.plateau_wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="plateau_wait")
        self.plateau_cooldown = tf.Variable(0, dtype=tf.int64, trainable=False, name="cooldown")
        self.milestones_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="milestones")


class ControlledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The schedule the optimizer owns: the base schedule, shifted and scaled by `LRState`."""

    def __init__(self, base: keras.optimizers.schedules.LearningRateSchedule, state: LRState):
        self.base = base
        self.state = state

    def __call__(self, step):
        shifted = tf.cast(step, tf.int64) + self.state.step_offset
        return self.state.multiplier * self.base(shifted)

    def get_config(self) -> dict:
        # The variables live in the checkpoint; the config describes the base curve.
        return {"base": keras.saving.serialize_keras_object(self.base)}


class LRController:
    """Decides multiplier changes at loop boundaries (host side, cheap: a few scalar reads)."""

    def __init__(
        self,
        *,
        config: ml_collections.ConfigDict,
        milestone_steps: tuple[int, ...],
        schedule: ControlledSchedule,
        state: LRState,
    ):
        self._config = config
        self._milestone_steps = milestone_steps
        self._schedule = schedule
        self._state = state

    def lr_at(self, step: int) -> float:
        """The LR the update after `step` applied updates will use."""
        return float(self._schedule(step).numpy())

    def _set_multiplier(self, value: float, step: int, reason: str) -> str:
        old_lr = self.lr_at(step)
        self._state.multiplier.assign(value)
        message = f"lr: {old_lr:.6g} -> {self.lr_at(step):.6g} at step {step} ({reason})"
        logging.info(message)
        return message

    def scale(self, factor: float, step: int, reason: str) -> str:
        """Multiplies the current LR (and the rest of the schedule) by `factor`."""
        return self._set_multiplier(self._state.multiplier.numpy() * factor, step, reason)

    def set(self, learning_rate: float, step: int, reason: str) -> str:
        """Makes the next update use `learning_rate`; the schedule then decays from there."""
        base = float(self._schedule.base(step + int(self._state.step_offset.numpy())).numpy())
        if base <= 0:
            raise ValueError(
                f"cannot set the LR to {learning_rate} at step {step}: the schedule is 0 there; "
                "use a multiplying action instead"
            )
        return self._set_multiplier(learning_rate / base, step, reason)

    def next_milestone(self) -> int | None:
        """The step of the next pending milestone, so the outer loop can stop exactly there."""
        done = int(self._state.milestones_done.numpy())
        return self._milestone_steps[done] if done < len(self._milestone_steps) else None

    def on_loop_end(self, step: int) -> list[str]:
        """Applies every milestone reached at `step`."""
        events = []
        while (milestone := self.next_milestone()) is not None and step >= milestone:
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
            raise ValueError(
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

    def apply_override_file(self, workdir: str, step: int) -> list[str]:
        """Applies `WORKDIR/lr_override.json` ({"set": lr} or {"multiply": factor}) if present.

        The file is renamed to `lr_override.applied-STEP.json` so it acts once and leaves a record.
        A malformed file is renamed `lr_override.rejected-STEP.json` and reported, and training
        goes on: a typo in a hand-written file must not kill a long run. Cost: one file-existence
        check per inner loop.
        """
        path = f"{workdir}/{OVERRIDE_FILE}"
        if not tf.io.gfile.exists(path):
            return []
        with tf.io.gfile.GFile(path) as f:
            text = f.read()
        try:
            request = json.loads(text)
            ((action, value),) = request.items()
            if action not in ("set", "multiply"):
                raise ValueError(action)
            value = float(value)
            if not 0 < value < math.inf:
                raise ValueError(value)
        except (AttributeError, TypeError, ValueError):  # Not a dict, null, a list...
            rejected = f"{workdir}/lr_override.rejected-{step}.json"
            tf.io.gfile.rename(path, rejected, overwrite=True)
            message = (
                f'{path} must hold {{"set": LR}} or {{"multiply": FACTOR}} with a positive '
                f"number, got {text!r}; ignored it (kept as {rejected}), write a new one"
            )
            logging.error("%s", message)
            return [message]
        tf.io.gfile.rename(path, f"{workdir}/lr_override.applied-{step}.json", overwrite=True)
        reason = f"manual override {request}"
        if action == "multiply":
            return [self.scale(value, step, reason)]
        try:
            return [self.set(value, step, reason)]
        except ValueError as error:  # The schedule is 0 here: nothing to scale from.
            logging.error("ignored %s: %s", reason, error)
            return [f"ignored {reason}: {error}"]

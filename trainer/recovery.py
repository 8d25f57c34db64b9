"""Going back to the last good checkpoint: after a non-finite loss (`nan_policy`) and after a
loss spike (`health.action=rollback`). Both are actions (trainer/actions.py) that decide; the
outer loop restores, multiplies the LR by the factor they give and replays from there.

A NaN state is never checkpointed (the loop restores before anything saves), so the newest
complete checkpoint is from before the bad loop. Counts are per process: a rerun starts at 0.
"""

import ml_collections
import numpy as np
from absl import logging

from trainer.actions import Action, Decision, LoopResult
from trainer.errors import ConfigError, UserError

NAN_POLICIES = ("fail", "recover")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates `nan_policy`, `nan_lr_factor` and `nan_max_recoveries` (the rollback's fields
    are `health.*`, checked by trainer/health)."""
    if config.nan_policy not in NAN_POLICIES:
        raise ConfigError(
            f"nan_policy ({config.nan_policy!r}) is not one of {', '.join(NAN_POLICIES)}"
        )
    if not 0 < config.nan_lr_factor <= 1:
        raise ConfigError(
            f"nan_lr_factor ({config.nan_lr_factor}) must be in (0, 1]; the LR is scaled by it "
            "after each NaN recovery, e.g. 0.5"
        )
    if config.nan_max_recoveries < 0:
        raise ConfigError(
            f"nan_max_recoveries ({config.nan_max_recoveries}) must be >= 0; 0 = fail on the "
            "first NaN"
        )


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN/Inf and `nan_policy` says to stop; the message names the fix."""


class UnstableTrainingError(UserError):
    """health.action=rollback rolled back `health.max_rollbacks` times and the loss still spiked."""


class NonFiniteRecovery(Action):
    """A non-finite loss or gradient norm in an applied update: stop (`nan_policy=fail`, with the
    last good checkpoint named) or go back to it with the LR x `nan_lr_factor` (`recover`).

    Skipped updates (health.action=skip, float16 overflow) left the weights as they were, so
    they are not counted.
    """

    def __init__(self, *, policy: str, lr_factor: float, max_recoveries: int):
        self.policy, self.lr_factor, self.max_recoveries = policy, lr_factor, max_recoveries
        self.recoveries = 0

    @classmethod
    def from_run(cls, run) -> "NonFiniteRecovery":
        config = run.config
        return cls(
            policy=config.nan_policy,
            lr_factor=config.nan_lr_factor,
            max_recoveries=config.nan_max_recoveries,
        )

    def after_train_loop(self, run, result: LoopResult) -> Decision | None:
        applied = result.column("skipped") == 0
        nonfinite = ~np.isfinite(result.steps[:, :2]).all(axis=1)  # Loss or gradient norm.
        if (nonfinite & applied).any():
            return self.recover(run, result.means["loss"])
        return None

    def recover(self, run, loss: float) -> Decision:
        """Applies the policy to a loss of `loss` in the loop that ended at `run.step`.

        Raises:
          NonFiniteLossError: the policy (or the number of recoveries) says to stop.
        """
        self.recoveries += 1
        complete = run.checkpointer.complete_steps()
        last_good = f"{run.checkpointer.directory}/ckpt-{complete[0]}" if complete else "none"
        if self.policy == "fail" or self.recoveries > self.max_recoveries:
            gave_up = f" after {self.max_recoveries} recoveries" if self.recoveries > 1 else ""
            raise NonFiniteLossError(
                f"training loss is {loss} in the inner loop ending at step {run.step}{gave_up}; "
                f"last good checkpoint: {last_good} (kept). Lower lr.base, set "
                "optimizer.grad_clip_norm, or use --config.nan_policy=recover"
            )
        logging.warning(
            "loss is %s at step %d: restoring %s (recovery %d of %d)",
            loss,
            run.step,
            last_good,
            self.recoveries,
            self.max_recoveries,
        )
        return Decision(restore_lr_factor=self.lr_factor, reason="NaN recovery")


class Rollback(Action):
    """health.action=rollback: a spike or explosion the health monitor found in this loop (it
    runs before this action) restores the newest complete checkpoint, saved before the loop
    that spiked, with the LR x `health.rollback_lr_factor`."""

    def __init__(self, *, lr_factor: float, max_rollbacks: int):
        self.lr_factor, self.max_rollbacks = lr_factor, max_rollbacks
        self.rollbacks = 0

    @classmethod
    def from_run(cls, run) -> "Rollback":
        health = run.config.health
        return cls(lr_factor=health.rollback_lr_factor, max_rollbacks=health.max_rollbacks)

    def after_train_loop(self, run, result: LoopResult) -> Decision | None:
        spikes = [event for event in result.events if event.kind in ("spike", "explode")]
        return self.roll_back(spikes[0]) if spikes else None

    def roll_back(self, event) -> Decision:
        """Decides the rollback for a health `event`.

        Raises:
          UnstableTrainingError: after `health.max_rollbacks` rollbacks in this process.
        """
        self.rollbacks += 1
        if self.rollbacks > self.max_rollbacks:
            raise UnstableTrainingError(
                f"health {event.kind} at step {event.step} after {self.max_rollbacks} "
                f"rollbacks: {event.message}"
            )
        logging.warning(
            "health %s at step %d: rolling back to the newest checkpoint (rollback %d of %d)",
            event.kind,
            event.step,
            self.rollbacks,
            self.max_rollbacks,
        )
        reason = f"health rollback: {event.kind} at step {event.step}: {event.message}"
        return Decision(restore_lr_factor=self.lr_factor, reason=reason)

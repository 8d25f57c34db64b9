"""A run in its workdir: its state with the checkpoints, LR control and metrics that go with it.

`train.py` drives the outer loop; this object owns what the loop must get right across a stop:
restoring or initializing, saving, recovering from a NaN, and applying an LR override durably.
"""

import json
import os

import ml_collections
import tensorflow as tf
from absl import logging

from trainer import (
    checkpointing,
    health,
    init_checkpoint,
    learning_rate,
    lr_control,
    lr_override,
    metrics,
)
from trainer import state as state_lib
from trainer.errors import ConfigError, UserError
from trainer.setup import Setup


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN/Inf and `nan_policy` says to stop; the message names the fix."""


class UnstableTrainingError(UserError):
    """health.action=rollback rolled back `health.max_rollbacks` times and the loss still spiked."""


class Run:
    """The state of one run and everything that reads or writes it between inner loops."""

    def __init__(self, setup: Setup, workdir: str):
        self.setup = setup
        self.workdir = workdir
        self.config: ml_collections.ConfigDict = setup.config
        self.plan = setup.plan
        # Model, optimizer (owning the LR) and the rest of the state, under the strategy.
        self.state = state_lib.build_state(setup)
        topology = setup.topology
        self.checkpointer = checkpointing.Checkpointer(
            self.state.checkpoint,
            workdir,
            is_chief=topology.is_chief,
            worker_index=topology.worker_index,
            max_to_keep=self.config.max_checkpoints_to_keep,
        )
        self.controller = lr_control.LRController(
            config=self.config.lr,
            milestone_steps=self.plan.milestones,
            schedule=self.state.schedule,
        )
        self.last_saved_step: int | None = None
        self._recoveries = 0
        self._rollbacks = 0
        self._config_changes: list[str] = []  # Found on resume; logged once the writer is open.
        self.writer: metrics.MetricWriter | None = None  # Opened once the resume step is known.

    @classmethod
    def start(cls, setup: Setup, workdir: str) -> "Run":
        """Builds the state, restores it (or writes ckpt-0) and opens the logs at its step."""
        run = cls(setup, workdir)
        run.restore_or_initialize()
        run.writer = metrics.MetricWriter(
            workdir,
            enabled=setup.topology.is_chief,
            total_steps=run.plan.total_steps,
            resume_step=run.state.step,
            step_offset=run.plan_step - run.step,
        )
        run._describe()
        for change in run._config_changes:
            run.writer.write(run.step, {"config_change": change}, kind="event")
        return run

    def _describe(self) -> None:
        """The resolved config and plan, in the workdir and TensorBoard; the planned LR curve."""
        config_json = self.config.to_json_best_effort(indent=2)
        if self.setup.topology.is_chief:
            with tf.io.gfile.GFile(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config_json)
        self.writer.write_text("plan", self.plan.summary())
        self.writer.write_text("config", config_json)
        if self.step == 0:
            self.writer.write_lr_curve(learning_rate.planned_curve(self.plan, self.config.lr))

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def plan_step(self) -> int:
        return self.state.plan_step

    @property
    def examples_seen(self) -> int:
        return int(self.state.examples_seen.numpy())

    def manifest(self) -> checkpointing.Manifest:
        return state_lib.manifest(self.setup, self.state)

    def restore_or_initialize(self) -> None:
        """Resumes from the newest readable checkpoint, or writes ckpt-0 for a fresh run.

        A fresh run first loads `init_checkpoint`'s model weights, if set (fine-tuning): ckpt-0
        then holds them, so a resume restores the run's own checkpoints and never reads that
        source again (it may be gone by then). Optimizer slots, step and LR state start fresh.

        What happens on resume: (1) model, optimizer slots and step, LR state, input position
        and dropout RNG come back; (2) the schedule is aligned with this run's plan (see
        `_align_schedule`); (3) training continues from `examples_seen` in the data stream.
        """
        restored = self.checkpointer.restore_latest(self.manifest())
        if restored is None:
            _refuse_fresh_start_over_history(self.workdir)
            if self.config.init_checkpoint:
                init_checkpoint.load(self.state.model, self.config)
                if self.state.ema is not None:  # Averages start at the loaded weights.
                    self.state.ema.reset()
            self.save()  # What NaN recovery returns to.
            return
        self._config_changes = _config_changes(restored.config, self.config)
        old = restored.plan
        if old["global_batch_size"] != self.plan.global_batch_size:
            logging.warning(
                "global batch changed %d -> %d on resume: continuing the schedule at step %d of "
                "the new plan (%d examples seen); peak lr %.6g -> %.6g",
                old["global_batch_size"],
                self.plan.global_batch_size,
                self.examples_seen // self.plan.global_batch_size,
                self.examples_seen,
                old["peak_lr"],
                self.plan.peak_lr,
            )
        if old["num_replicas"] != self.plan.num_replicas:
            logging.warning(
                "replicas changed %d -> %d on resume", old["num_replicas"], self.plan.num_replicas
            )
        self._align_schedule(restored)
        self.last_saved_step = self.step
        logging.info("resumed at step %d (%d examples seen)", self.step, self.examples_seen)
        if self.plan_step >= self.plan.total_steps:
            logging.warning(
                "nothing to do: the checkpoint at step %d (%d examples seen) already completes "
                "this plan of %d steps of %d examples; raise total_steps (or total_epochs / "
                "total_examples) to train on",
                self.step,
                self.examples_seen,
                self.plan.total_steps,
                self.plan.global_batch_size,
            )

    def _align_schedule(self, restored: checkpointing.Manifest) -> None:
        """Puts the restored LR state on this run's plan axis, after every restore.

        The plan step is derived from the examples seen, never trusted from the checkpoint: one
        written under another global batch holds that plan's offset (and floor), and restoring it
        as is would rewind or skip the schedule (also when a NaN recovery restores it).
        """
        lr_state = self.state.lr_state
        batch = self.plan.global_batch_size
        lr_state.step_offset.assign(self.examples_seen // batch - self.step)
        old_batch = restored.plan["global_batch_size"]
        lr_state.floor.assign(int(lr_state.floor.numpy()) * old_batch // batch)

    def save(self) -> None:
        """Checkpoints the state at the current step (its manifest marks it complete)."""
        self.checkpointer.save(self.manifest())
        self.last_saved_step = self.step

    def recover_from_non_finite(self, loss: float) -> str:
        """Applies `config.nan_policy`; a NaN state is never checkpointed, older ones stay.

        Returns the LR event of the recovery. Raises NonFiniteLossError when the policy (or the
        number of recoveries) says to stop.
        """
        self._recoveries += 1
        config = self.config
        complete = self.checkpointer.complete_steps()
        last_good = f"{self.checkpointer.directory}/ckpt-{complete[0]}" if complete else "none"
        if config.nan_policy == "fail" or self._recoveries > config.nan_max_recoveries:
            gave_up = (
                f" after {config.nan_max_recoveries} recoveries" if self._recoveries > 1 else ""
            )
            raise NonFiniteLossError(
                f"training loss is {loss} in the inner loop ending at step {self.step}{gave_up}; "
                f"last good checkpoint: {last_good} (kept). Lower lr.base, set "
                "optimizer.grad_clip_norm, or use --config.nan_policy=recover"
            )
        logging.warning(
            "loss is %s at step %d: restoring %s (recovery %d of %d)",
            loss,
            self.step,
            last_good,
            self._recoveries,
            config.nan_max_recoveries,
        )
        self._restore_newest()
        return self.controller.scale(config.nan_lr_factor, self.step, "NaN recovery")

    def roll_back(self, event: health.Event) -> str:
        """health.action=rollback after a spike or explosion: today's NaN recovery, for spikes.

        Restores the newest complete checkpoint (saved before the loop that spiked, so before
        the spike) and multiplies the LR by `health.rollback_lr_factor`. Returns the LR event.
        Raises UnstableTrainingError after `health.max_rollbacks` rollbacks in this process.
        """
        self._rollbacks += 1
        config = self.config.health
        if self._rollbacks > config.max_rollbacks:
            raise UnstableTrainingError(
                f"health {event.kind} at step {event.step} after {config.max_rollbacks} "
                f"rollbacks: {event.message}"
            )
        logging.warning(
            "health %s at step %d: rolling back to the newest checkpoint (rollback %d of %d)",
            event.kind,
            event.step,
            self._rollbacks,
            config.max_rollbacks,
        )
        self._restore_newest()
        reason = f"health rollback: {event.kind} at step {event.step}: {event.message}"
        return self.controller.scale(config.rollback_lr_factor, self.step, reason)

    def _restore_newest(self) -> None:
        """Back to the newest complete checkpoint; the logs forget what came after it."""
        restored = self.checkpointer.restore_latest(self.manifest())
        self._align_schedule(restored)
        self.writer.rewind(self.step)

    def take_lr_override(self) -> tuple[list[str], bool]:
        """Applies a pending `lr_override.json`; returns its events and whether it changed the LR.

        The chief reads the file; on a multi-worker run it broadcasts what it read, so every
        worker calls this at the same loop boundary (it is a collective there) and applies the
        same request. A change is marked applied (the file renamed) only after `save()` made it
        durable, so the caller must save when this returns True and then have the chief call
        `lr_override.mark_applied`.
        """
        step = self.step
        topology = self.setup.topology
        request, events = None, []
        if topology.is_chief:
            try:
                request = lr_override.take_pending(self.workdir, step)
            except lr_override.Rejected as rejected:
                logging.error("%s", rejected)
                events = [str(rejected)]
        if topology.num_workers > 1:
            request = lr_override.broadcast_from_chief(self.setup.strategy, request)
        if request is None:
            return events, False
        try:
            event = self.controller.apply_override(request, step)
        except ConfigError as error:  # A set where the schedule is 0: nothing to scale from.
            message = f"ignored manual override {request}: {error}"
            if topology.is_chief:
                lr_override.mark_rejected(self.workdir, step)
                logging.error("%s", message)
            return [message], False
        logging.info("worker %d: %s", topology.worker_index, event)  # Every worker says it.
        return [event], True

    def log_events(self, events: list[str]) -> None:
        for event in events:
            self.writer.write(self.step, {"lr_event": event}, kind="event")


# What makes a workdir "used": a fresh start there would overwrite (and truncate) its history.
_HISTORY = ("metrics.jsonl", "config.json", "tensorboard", "lr_override.applied-*.json")
# Fields whose change breaks the exact data order of a resumed run (batch k = f(seed, examples)).
_DATA_ORDER_FIELDS = ("seed", "dataset.name", "dataset.train_split")


def _refuse_fresh_start_over_history(workdir: str) -> None:
    """A workdir that shows a run happened but has no checkpoint is never silently restarted."""
    found = sorted(
        {os.path.basename(p) for name in _HISTORY for p in tf.io.gfile.glob(f"{workdir}/{name}")}
    )
    if found:
        raise checkpointing.CheckpointError(
            f"{workdir} has the history of a run ({', '.join(found)}) but no checkpoint to resume "
            f"from in {workdir}/checkpoints; to start over deliberately use a new --workdir (or "
            "move those files away): a fresh start here would overwrite that history"
        )


def _config_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Every field that differs from the config the checkpoint was written with, logged; refused
    where it breaks the data order, unless `allow_data_change_on_resume` says it is meant."""
    old = checkpointing.flatten_config(saved)
    new = checkpointing.flatten_config(json.loads(config.to_json_best_effort()))
    changes = [
        f"{field}: {json.dumps(old.get(field))} -> {json.dumps(new.get(field))}"
        for field in sorted(old.keys() | new.keys())
        if old.get(field) != new.get(field)
    ]
    for change in changes:
        logging.warning("config changed on resume: %s", change)
    breaking = [c for c in changes if c.split(":")[0] in _DATA_ORDER_FIELDS]
    if breaking and not config.allow_data_change_on_resume:
        raise ConfigError(
            f"resuming with {'; '.join(breaking)} would break the exact data order of this run; "
            "resume with the values it was started with, use a new --workdir, or pass "
            "--config.allow_data_change_on_resume=True if you mean it"
        )
    return changes

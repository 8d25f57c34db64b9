"""A run in its workdir: its state with the checkpoints and metrics that go with it.

`train.py` drives the outer loop; this object owns what the loop must get right across a stop:
restoring or initializing, saving, and going back to a checkpoint with a lower LR. It is also
the one handle the actions (trainer/actions.py) get.
"""

import json
import os

import ml_collections
import tensorflow as tf
from absl import logging

from trainer import checkpointing, features, learning_rate, metrics, task
from trainer import state as state_lib
from trainer.errors import ConfigError
from trainer.setup import Setup


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
        self.last_saved_step: int | None = None
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
            task_metrics=task.metric_names(setup.num_classes),
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
    def topology(self):
        return self.setup.topology

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self.setup.strategy

    @property
    def num_classes(self) -> int:
        return self.setup.num_classes

    @property
    def schedule(self) -> learning_rate.ControlledSchedule:
        """The optimizer's own schedule: every mid-run LR change goes through it."""
        return self.state.schedule

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def done(self) -> bool:
        return self.plan_step >= self.plan.total_steps

    def is_time(self, every: int) -> bool:
        """Whether a periodic action is due now: every `every` plan steps, and at the end. The
        one place the outer loop and the actions ask it (the loop stops at each multiple)."""
        return self.plan_step % every == 0 or self.done

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
            if init_checkpoint := features.if_asked("init_checkpoint", self.config):
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

    def restore(self, lr_factor: float, reason: str) -> str:
        """Back to the newest complete checkpoint, with the LR x `lr_factor` from there on; the
        logs forget what came after it. Returns the LR event (logged at the restored step)."""
        restored = self.checkpointer.restore_latest(self.manifest())
        self._align_schedule(restored)
        self.writer.rewind(self.step)
        event = self.schedule.scale(lr_factor, self.step, reason)
        self.log_events([event])
        return event

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

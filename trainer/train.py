"""`train_and_evaluate(config, workdir)`: the whole run, top to bottom."""

import dataclasses
import math
import os
import time

import ml_collections
import tensorflow as tf
from absl import logging

from trainer import checkpointing, data, loop, lr_control, metrics, preemption, workdir_lock
from trainer import plan as plan_lib
from trainer import state as state_lib


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf and `nan_policy` says to stop; the message names the fix."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains and evaluates the model described by `config`, checkpointing into `workdir`.

    Returns the final eval metrics. Raises `preemption.Preempted` after checkpointing when the
    process received SIGTERM/SIGINT (main.py turns it into exit code 42).
    """
    # 1. Strategy, data and the plan: every derived number, computed and logged once.
    setup = state_lib.prepare(config)
    workdir_lock.make_workdir(workdir)
    # 2. One trainer per workdir (the chief holds the lock; other workers write nothing).
    lock = workdir_lock.WorkdirLock(workdir) if setup.topology.is_chief else None
    if lock:
        lock.acquire()
    try:
        return _train(config, workdir, setup)
    finally:
        if lock:
            lock.release()


def _restore_or_initialize(
    config: ml_collections.ConfigDict,
    plan: plan_lib.Plan,
    state: state_lib.TrainState,
    checkpointer: checkpointing.Checkpointer,
) -> None:
    """Resumes from the newest readable checkpoint, or writes ckpt-0 for a fresh run.

    What happens on resume: (1) model, optimizer slots and step, LR controller state, input
    position and dropout RNG come back; (2) if the global batch changed, the schedule is shifted
    so it continues from the same number of examples (its peak was already rescaled by the plan);
    (3) training continues from `examples_seen` in the data stream.
    """
    restored = checkpointer.restore_latest(state_lib.manifest(config, plan, state))
    if restored is None:
        checkpointer.save(state_lib.manifest(config, plan, state))  # What NaN recovery returns to.
        return
    old = restored.plan
    examples = int(state.examples_seen.numpy())
    if old["global_batch_size"] != plan.global_batch_size:
        plan_step = examples // plan.global_batch_size
        state.lr_state.step_offset.assign(plan_step - state.step)
        logging.warning(
            "global batch changed %d -> %d on resume: continuing the schedule at step %d of the "
            "new plan (%d examples seen); peak lr %.6g -> %.6g",
            old["global_batch_size"],
            plan.global_batch_size,
            plan_step,
            examples,
            old["peak_lr"],
            plan.peak_lr,
        )
    if old["num_replicas"] != plan.num_replicas:
        logging.warning(
            "replicas changed %d -> %d on resume", old["num_replicas"], plan.num_replicas
        )
    logging.info("resumed at step %d (%d examples seen)", state.step, examples)


def _next_stop(
    plan_step: int, config: ml_collections.ConfigDict, plan: plan_lib.Plan, milestone: int | None
) -> int:
    """The next plan step where the host must act; the inner loop runs exactly up to it."""
    stops = [plan.total_steps, plan_step + config.steps_per_loop]
    for every in (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps):
        stops.append((plan_step // every + 1) * every)
    if milestone is not None and milestone > plan_step:
        stops.append(milestone)
    return min(stops)


@dataclasses.dataclass
class _Window:
    """Train numbers accumulated on the host between two log records."""

    loss: float = 0.0
    accuracy: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def add(self, outputs: dict[str, float], steps: int, seconds: float) -> None:
        self.loss += outputs["loss"] * steps
        self.accuracy += outputs["accuracy"] * steps
        self.steps += steps
        self.seconds += seconds


def _train(config: ml_collections.ConfigDict, workdir: str, setup: state_lib.Setup) -> dict:
    plan, topology, strategy = setup.plan, setup.topology, setup.strategy
    # 3. Model, optimizer (owning the LR) and the rest of the state, under the strategy.
    state = state_lib.build_state(config, setup, plan_lib.make_schedule(plan, config.lr))
    checkpointer = checkpointing.Checkpointer(
        state.checkpoint,
        workdir,
        is_chief=topology.is_chief,
        worker_index=topology.worker_index,
        max_to_keep=config.max_checkpoints_to_keep,
    )
    # 4. Restore or initialize: never a silent fresh start (see Checkpointer.restore_latest).
    _restore_or_initialize(config, plan, state, checkpointer)

    controller = lr_control.LRController(
        config=config.lr,
        milestone_steps=plan.milestones,
        schedule=state.schedule,
        state=state.lr_state,
    )
    writer = metrics.MetricWriter(
        workdir, enabled=topology.is_chief, total_steps=plan.total_steps, resume_step=state.step
    )
    if topology.is_chief:
        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    writer.write_text("plan", plan.summary())
    writer.write_text("config", config.to_json_best_effort(indent=2))
    if state.step == 0:
        writer.write_lr_curve(plan_lib.lr_curve(plan, config.lr))

    train_loop = loop.make_train_loop(
        strategy=strategy,
        model=state.model,
        optimizer=state.optimizer,
        global_batch_size=plan.global_batch_size,
        grad_clip_norm=config.optimizer.grad_clip_norm,
        nan_trigger=state.nan_trigger,
    )
    eval_loop = loop.make_eval_loop(strategy=strategy, model=state.model)
    eval_fn, eval_steps = data.eval_dataset_fn(
        setup.eval_split,
        global_batch_size=plan.global_batch_size,
        preprocessing=setup.preprocessing,
    )
    eval_dataset = strategy.distribute_datasets_from_function(eval_fn)

    def evaluate() -> dict[str, float]:
        outputs = eval_loop(iter(eval_dataset), tf.constant(eval_steps))
        return {k: float(v.numpy()) for k, v in outputs.items()}

    def save() -> None:
        checkpointer.save(state_lib.manifest(config, plan, state))

    def log_events(step: int, events: list[str]) -> None:
        for event in events:
            writer.write(step, {"lr_event": event}, kind="event")

    watcher = preemption.PreemptionWatcher(strategy, topology.num_workers)
    iterator = state_lib.train_iterator(config, setup, state)
    recoveries = 0
    window = _Window()
    eval_metrics: dict[str, float] = {}
    last_saved = state.step
    try:
        # 5. The outer loop: an inner loop of steps in one tf.function, then host-side work.
        while state.plan_step < plan.total_steps:
            plan_step = state.plan_step
            num_steps = _next_stop(plan_step, config, plan, controller.next_milestone()) - plan_step
            started = time.monotonic()
            outputs = train_loop(iterator, tf.constant(num_steps))
            outputs = {k: float(v.numpy()) for k, v in outputs.items()}  # The one host sync.
            seconds = time.monotonic() - started
            state.examples_seen.assign_add(num_steps * plan.global_batch_size)

            if not math.isfinite(outputs["loss"]):
                recoveries += 1
                _handle_non_finite(config, plan, state, checkpointer, outputs["loss"], recoveries)
                writer.rewind(state.step)
                log_events(
                    state.step, [controller.scale(config.nan_lr_factor, state.step, "NaN recovery")]
                )
                iterator = state_lib.train_iterator(config, setup, state)
                window = _Window()
                continue

            window.add(outputs, num_steps, seconds)
            step, plan_step = state.step, state.plan_step
            done = plan_step >= plan.total_steps
            events = controller.on_loop_end(plan_step)
            if topology.num_workers == 1:  # Multi-worker: not broadcast yet (BUILD_NOTES, limits).
                events += controller.apply_override_file(workdir, step)

            if plan_step % config.log_every_steps == 0 or done:
                examples_seen = int(state.examples_seen.numpy())
                writer.write(
                    step,
                    {
                        "learning_rate": outputs["learning_rate"],  # Applied in update `step`.
                        "loss": window.loss / window.steps,
                        "accuracy": window.accuracy / window.steps,
                        "examples_per_sec": window.steps * plan.global_batch_size / window.seconds,
                        "examples_seen": examples_seen,
                        "epoch": examples_seen / plan.train_examples,
                    },
                )
                window = _Window()
            log_events(step, events)

            if plan_step % config.eval_every_steps == 0 or done:
                eval_metrics = evaluate()
                writer.write(step, eval_metrics, kind="eval")
                log_events(step, controller.on_eval(plan_step, eval_metrics))

            if plan_step % config.checkpoint_every_steps == 0 or done:
                save()
                last_saved = step
            if watcher.should_stop():
                if last_saved != step:
                    save()
                raise preemption.Preempted(step)
    finally:
        watcher.close()
        writer.close()
    return eval_metrics


def _handle_non_finite(
    config: ml_collections.ConfigDict,
    plan: plan_lib.Plan,
    state: state_lib.TrainState,
    checkpointer: checkpointing.Checkpointer,
    loss: float,
    recoveries: int,
) -> None:
    """Applies `config.nan_policy`; a NaN state is never checkpointed, older checkpoints stay."""
    if state.nan_trigger is not None:
        state.nan_trigger.assign(-1)  # The test hook fires once per process.
    complete = checkpointer.complete_steps()
    last_good = f"{checkpointer.directory}/ckpt-{complete[0]}" if complete else "none"
    if config.nan_policy == "fail" or recoveries > config.nan_max_recoveries:
        gave_up = f" after {config.nan_max_recoveries} recoveries" if recoveries > 1 else ""
        raise NonFiniteLossError(
            f"training loss is {loss} in the inner loop ending at step {state.step}{gave_up}; "
            f"last good checkpoint: {last_good} (kept). Lower lr.base, set "
            "optimizer.grad_clip_norm, or use --config.nan_policy=recover"
        )
    logging.warning(
        "loss is %s at step %d: restoring %s (recovery %d of %d)",
        loss,
        state.step,
        last_good,
        recoveries,
        config.nan_max_recoveries,
    )
    checkpointer.restore_latest(state_lib.manifest(config, plan, state))

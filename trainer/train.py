"""`train_and_evaluate(config, workdir)`: the whole run, top to bottom."""

import dataclasses
import json
import math
import os
import time

import keras
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from trainer import (
    checkpointing,
    data,
    distribute,
    loop,
    lr_control,
    metrics,
    models,
    optimizers,
    plan as plan_lib,
    preemption,
    workdir_lock,
)


@dataclasses.dataclass
class _State:
    """Everything a step depends on; all of it is in the checkpoint."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    lr_state: lr_control.LRState
    schedule: lr_control.ControlledSchedule
    examples_seen: tf.Variable  # The input position: the stream resumes exactly here.
    nan_trigger: tf.Variable | None  # Test hook (config.inject_nan_at_step).
    checkpoint: tf.train.Checkpoint

    @property
    def step(self) -> int:
        """Optimizer updates applied so far (`.numpy()`: int() fails under a strategy)."""
        return int(self.optimizer.iterations.numpy())

    @property
    def plan_step(self) -> int:
        """Position on the plan's step axis; differs from `step` only after the global batch
        changed on resume (the schedule position is kept in examples)."""
        return self.step + int(self.lr_state.step_offset.numpy())


def _set_determinism(config: ml_collections.ConfigDict) -> bool:
    deterministic = config.deterministic
    if deterministic is None:  # Default: on unless an accelerator is present.
        deterministic = not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    return deterministic


def _build_state(
    config: ml_collections.ConfigDict,
    strategy: tf.distribute.Strategy,
    plan: plan_lib.Plan,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> _State:
    # Seeded here, right before the weights are drawn: preparing a dataset on first use consumes
    # global randomness, so seeding earlier made a first run start from other weights.
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = models.build_model(config.model, input_shape, num_classes, seed=config.seed)
        lr_state = lr_control.LRState(config.lr.plateau_mode)
        schedule = lr_control.ControlledSchedule(plan_lib.make_schedule(plan, config.lr), lr_state)
        optimizer = optimizers.build_optimizer(config.optimizer, schedule, model.trainable_variables)
        nan_trigger = None
        if config.inject_nan_at_step >= 0:
            nan_trigger = tf.Variable(config.inject_nan_at_step, dtype=tf.int64, trainable=False)
    examples_seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples_seen")
    checkpoint = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        lr_state=lr_state,
        examples_seen=examples_seen,
        rng=checkpointing.seed_generator_states(model),
    )
    return _State(model, optimizer, lr_state, schedule, examples_seen, nan_trigger, checkpoint)


def _manifest(
    config: ml_collections.ConfigDict, plan: plan_lib.Plan, state: _State
) -> checkpointing.Manifest:
    return checkpointing.Manifest(
        step=state.step,
        examples_seen=int(state.examples_seen.numpy()),
        model=config.model.name,
        model_variables=[list(v.shape) for v in state.model.weights],
        optimizer=config.optimizer.name,
        plan=dataclasses.asdict(plan),
        config=json.loads(config.to_json()),
        versions={"tensorflow": tf.__version__, "keras": keras.__version__, "tfds": tfds.__version__},
    )


def _restore_or_initialize(
    config: ml_collections.ConfigDict,
    plan: plan_lib.Plan,
    state: _State,
    checkpointer: checkpointing.Checkpointer,
) -> None:
    """Resumes from the newest readable checkpoint, or writes ckpt-0 for a fresh run.

    What happens on resume: (1) model, optimizer slots and step, LR controller state, input
    position and dropout RNG come back; (2) if the global batch changed, the schedule is shifted
    so it continues from the same number of examples (its peak was already rescaled by the plan);
    (3) training continues from `examples_seen` in the data stream.
    """
    restored = checkpointer.restore_latest(_manifest(config, plan, state))
    if restored is None:
        checkpointer.save(_manifest(config, plan, state))  # The base a NaN recovery returns to.
        return
    old_plan = plan_lib.Plan(**{**restored.plan, "boundaries": (), "milestones": ()})
    examples = int(state.examples_seen.numpy())
    if old_plan.global_batch_size != plan.global_batch_size:
        plan_step = examples // plan.global_batch_size
        state.lr_state.step_offset.assign(plan_step - state.step)
        logging.warning(
            "global batch changed %d -> %d on resume: continuing the schedule at step %d of the new "
            "plan (%d examples seen); peak lr %.6g -> %.6g",
            old_plan.global_batch_size,
            plan.global_batch_size,
            plan_step,
            examples,
            old_plan.peak_lr,
            plan.peak_lr,
        )
    if old_plan.num_replicas != plan.num_replicas:
        logging.warning("replicas changed %d -> %d on resume", old_plan.num_replicas, plan.num_replicas)
    logging.info("resumed at step %d (%d examples seen)", state.step, examples)


def _next_stop(plan_step: int, config: ml_collections.ConfigDict, plan: plan_lib.Plan, milestone) -> int:
    """The next plan step where the host must act; the inner loop runs exactly up to it."""
    stops = [plan.total_steps, plan_step + config.steps_per_loop]
    for every in (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps):
        stops.append((plan_step // every + 1) * every)
    if milestone is not None and milestone > plan_step:
        stops.append(milestone)
    return min(stops)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf and `nan_policy` says to stop; the message names the fix."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains and evaluates the model described by `config`, checkpointing into `workdir`.

    Returns the final eval metrics. Raises `preemption.Preempted` after checkpointing when the
    process received SIGTERM/SIGINT (main.py turns it into exit code 42).
    """
    # 1. The strategy first: logical CPU devices must be set up before any TF op runs.
    strategy = distribute.create_strategy(config.distribution)
    topology = distribute.topology(strategy, config.distribution.strategy)
    plan_lib.check_config(config)
    deterministic = _set_determinism(config)

    # 2. Data, then the plan that depends on its size and on the topology.
    train_split = data.load_split(config.dataset, config.dataset.train_split)
    eval_split = data.load_split(config.dataset, config.dataset.eval_split)
    plan = plan_lib.make_plan(
        config,
        num_replicas=topology.num_replicas,
        num_workers=topology.num_workers,
        train_examples=train_split.num_examples,
    )
    logging.info("%s | deterministic: %s", plan.summary(), deterministic)

    tf.io.gfile.makedirs(workdir)
    lock = workdir_lock.WorkdirLock(workdir) if topology.is_chief else None
    if lock:
        lock.acquire()
    try:
        return _train(config, workdir, strategy, topology, plan, train_split, eval_split)
    finally:
        if lock:
            lock.release()


def _train(config, workdir, strategy, topology, plan, train_split, eval_split) -> dict[str, float]:
    # 3. Model, optimizer (owning the LR) and the rest of the state, under the strategy.
    state = _build_state(
        config, strategy, plan, train_split.images.shape[1:], data.num_classes(config.dataset)
    )
    checkpointer = checkpointing.Checkpointer(
        state.checkpoint,
        workdir,
        is_chief=topology.is_chief,
        worker_index=topology.worker_index,
        max_to_keep=config.max_checkpoints_to_keep,
    )
    # 4. Restore or initialize: never a silent fresh start (see Checkpointer.restore_latest).
    _restore_or_initialize(config, plan, state, checkpointer)
    if topology.is_chief:
        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    controller = lr_control.LRController(
        config=config.lr, milestone_steps=plan.milestones, schedule=state.schedule, state=state.lr_state
    )
    writer = metrics.MetricWriter(
        workdir, enabled=topology.is_chief, total_steps=plan.total_steps, resume_step=state.step
    )
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
    eval_fn, eval_steps = data.eval_dataset_fn(eval_split, global_batch_size=plan.global_batch_size)
    eval_dataset = strategy.distribute_datasets_from_function(eval_fn)

    def evaluate() -> dict[str, float]:
        outputs = eval_loop(iter(eval_dataset), tf.constant(eval_steps))
        return {k: float(v.numpy()) for k, v in outputs.items()}

    def train_iterator():
        dataset_fn = data.train_dataset_fn(
            train_split,
            global_batch_size=plan.global_batch_size,
            start_position=int(state.examples_seen.numpy()),
            seed=config.seed,
        )
        return iter(strategy.distribute_datasets_from_function(dataset_fn))

    def save() -> None:
        checkpointer.save(_manifest(config, plan, state))

    watcher = preemption.PreemptionWatcher(strategy, topology.num_workers)
    iterator = train_iterator()
    recoveries = 0
    window = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "seconds": 0.0}
    eval_metrics: dict[str, float] = {}
    last_saved = state.step
    try:
        # 5. The outer loop: an inner loop of steps in one tf.function, then host-side work.
        while state.plan_step < plan.total_steps:
            plan_step = state.plan_step
            num_steps = _next_stop(plan_step, config, plan, controller.next_milestone()) - plan_step
            started = time.monotonic()
            outputs = train_loop(iterator, tf.constant(num_steps))
            loss = float(outputs["loss"].numpy())  # The one host sync per inner loop.
            window["seconds"] += time.monotonic() - started
            state.examples_seen.assign_add(num_steps * plan.global_batch_size)

            if not math.isfinite(loss):
                recoveries += 1
                _handle_non_finite(config, plan, state, checkpointer, loss, recoveries)
                writer.rewind(state.step)
                event = controller.scale(config.nan_lr_factor, state.step, "NaN recovery")
                writer.write(state.step, {"lr_event": event}, kind="event")
                iterator = train_iterator()
                window = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "seconds": 0.0}
                continue

            window["loss"] += loss * num_steps
            window["accuracy"] += float(outputs["accuracy"].numpy()) * num_steps
            window["steps"] += num_steps
            step, plan_step = state.step, state.plan_step
            done = plan_step >= plan.total_steps

            events = controller.on_loop_end(plan_step)
            if topology.num_workers == 1:  # Multi-worker: see README (override not broadcast).
                events += controller.apply_override_file(workdir, step)

            if plan_step % config.log_every_steps == 0 or done:
                writer.write(
                    step,
                    {
                        "learning_rate": float(outputs["learning_rate"].numpy()),
                        "loss": window["loss"] / window["steps"],
                        "accuracy": window["accuracy"] / window["steps"],
                        "examples_per_sec": window["steps"] * plan.global_batch_size / window["seconds"],
                        "examples_seen": int(state.examples_seen.numpy()),
                        "epoch": int(state.examples_seen.numpy()) / plan.train_examples,
                    },
                )
                window = {"loss": 0.0, "accuracy": 0.0, "steps": 0, "seconds": 0.0}
            for event in events:
                writer.write(step, {"lr_event": event}, kind="event")

            if plan_step % config.eval_every_steps == 0 or done:
                eval_metrics = evaluate()
                writer.write(step, eval_metrics, kind="eval")
                for event in controller.on_eval(plan_step, eval_metrics):
                    writer.write(step, {"lr_event": event}, kind="event")

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
    state: _State,
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
    checkpointer.restore_latest(_manifest(config, plan, state))

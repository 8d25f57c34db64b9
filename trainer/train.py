"""`train_and_evaluate(config, workdir)`: the whole run, top to bottom."""

import dataclasses
import math
import time
from contextlib import nullcontext

import ml_collections
import tensorflow as tf

from trainer import loop, lr_override, preemption, workdir_lock
from trainer import setup as setup_lib
from trainer.run import Run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains and evaluates the model described by `config`, checkpointing into `workdir`.

    Returns the final eval metrics. Raises `preemption.Preempted` after checkpointing when the
    process received SIGTERM/SIGINT (the command line turns it into exit code 42).
    """
    with preemption.watching() as signals:  # From here on a signal means "stop, exit 42".
        # 1. Strategy, data and the plan: every derived number, computed and logged once. Every
        #    user error is raised here, before anything is written.
        setup = setup_lib.prepare(config)
        signals.take_back_handlers()
        if signals.received:
            raise preemption.Preempted(None)
        workdir_lock.make_workdir(workdir)
        # 2. One trainer per workdir (the chief holds the lock; other workers write nothing).
        lock = workdir_lock.WorkdirLock(workdir) if setup.topology.is_chief else nullcontext()
        with lock:
            # 3. Model, optimizer (owning the LR) and the rest of the state, under the strategy;
            # 4. restored from the newest complete checkpoint, or a fresh ckpt-0: never a silent
            #    fresh start (see Run.restore_or_initialize).
            run = Run.start(setup, workdir)
            try:
                return _train(run, signals)
            finally:
                run.writer.close()


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


def _next_stop(plan_step: int, config: ml_collections.ConfigDict, total: int, milestone) -> int:
    """The next plan step where the host must act; the inner loop runs exactly up to it."""
    stops = [total, plan_step + config.steps_per_loop]
    for every in (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps):
        stops.append((plan_step // every + 1) * every)
    if milestone is not None and milestone > plan_step:
        stops.append(milestone)
    return min(stops)


def _train(run: Run, signals: preemption.SignalWatcher) -> dict[str, float]:
    setup, config, plan, state = run.setup, run.config, run.plan, run.state
    # 5. The compiled inner loops and both inputs, built once (the train input is rebuilt only
    #    when a NaN recovery moves the input position back).
    train_loop = loop.make_train_loop(
        strategy=setup.strategy,
        model=state.model,
        optimizer=state.optimizer,
        global_batch_size=plan.global_batch_size,
        grad_clip_norm=config.optimizer.grad_clip_norm,
    )
    eval_loop = loop.make_eval_loop(strategy=setup.strategy, model=state.model)
    train_iterator = setup.train_iterator(run.examples_seen)
    eval_dataset, eval_steps = setup.eval_input()

    def evaluate() -> dict[str, float]:
        outputs = eval_loop(iter(eval_dataset), tf.constant(eval_steps))
        return {k: float(v.numpy()) for k, v in outputs.items()}

    window = _Window()
    eval_metrics: dict[str, float] = {}
    num_workers = setup.topology.num_workers
    # 6. The outer loop: an inner loop of steps in one tf.function, then host-side work. A signal
    #    received at any time (also during set-up or restore) stops it at the next boundary.
    while run.plan_step < plan.total_steps:
        if signals.should_stop(setup.strategy, num_workers):
            if run.last_saved_step != run.step:
                run.save()
            raise preemption.Preempted(run.step)
        plan_step = run.plan_step
        stop = _next_stop(plan_step, config, plan.total_steps, run.controller.next_milestone())
        num_steps = stop - plan_step
        started = time.monotonic()
        outputs = train_loop(train_iterator, tf.constant(num_steps))
        outputs = {k: float(v.numpy()) for k, v in outputs.items()}  # The one host sync.
        seconds = time.monotonic() - started
        state.examples_seen.assign_add(num_steps * plan.global_batch_size)

        if not math.isfinite(outputs["loss"]):
            run.log_events([run.recover_from_non_finite(outputs["loss"])])
            train_iterator = setup.train_iterator(run.examples_seen)
            window = _Window()
            continue

        window.add(outputs, num_steps, seconds)
        plan_step = run.plan_step
        done = plan_step >= plan.total_steps
        events = run.controller.on_loop_end(run.step)

        if plan_step % config.log_every_steps == 0 or done:
            run.writer.write(
                run.step,
                {
                    "learning_rate": outputs["learning_rate"],  # Applied in update `step`.
                    "loss": window.loss / window.steps,
                    "accuracy": window.accuracy / window.steps,
                    "examples_per_sec": window.steps * plan.global_batch_size / window.seconds,
                    "examples_seen": run.examples_seen,
                    "epoch": run.examples_seen / plan.train_examples,
                },
            )
            window = _Window()
        run.log_events(events)

        if plan_step % config.eval_every_steps == 0 or done:
            eval_metrics = evaluate()
            run.writer.write(run.step, eval_metrics, kind="eval")
            run.log_events(run.controller.on_eval(run.step, eval_metrics))

        # Multi-worker: the override file is not broadcast yet (BUILD_NOTES, limits).
        override_events, overridden = ([], False) if num_workers > 1 else run.take_lr_override()
        run.log_events(override_events)
        if plan_step % config.checkpoint_every_steps == 0 or done or overridden:
            run.save()
        if overridden:  # Only now is the change durable: the file may leave the queue.
            lr_override.mark_applied(run.workdir, run.step)
    return eval_metrics

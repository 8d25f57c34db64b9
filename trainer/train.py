"""`train_and_evaluate(config, workdir)`: the whole run, top to bottom.

The outer loop knows no feature: it runs the inner loop, evaluates and checkpoints when it is
time, and hands every result to the run's actions in their declared order (trainer/actions.py
says what each hook is for and why the order is what it is). Preemption (exit 42), a lost
worker (exit 43) and the workdir lock stay here, in the core.
"""

import time
from contextlib import nullcontext

import ml_collections
import tensorflow as tf

from trainer import (
    export,
    features,
    loop,
    lost_worker,
    lr_override,
    preemption,
    records,
    recovery,
    watchdog,
    workdir_lock,
)
from trainer import setup as setup_lib
from trainer.actions import Action, Actions, LoopResult, Phase, load_user_action
from trainer.health import monitoring
from trainer.run import Run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains and evaluates the model described by `config`, checkpointing into `workdir`.

    Returns the final eval metrics. Raises `preemption.Preempted` after checkpointing when the
    process received SIGTERM/SIGINT (the command line turns it into exit code 42), and
    `lost_worker.LostWorker` on a multi-worker run that lost another worker (exit code 43).
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
            # 4. restored from the newest complete checkpoint, or a fresh ckpt-0 (with
            #    init_checkpoint's weights when fine-tuning): never a silent fresh start (see
            #    Run.restore_or_initialize).
            run = Run.start(setup, workdir)
            actions = build_actions(run)
            try:
                return _train(run, signals, actions)
            except lost_worker.LOST_CONTACT_ERRORS as error:
                if setup.topology.num_workers == 1:
                    raise
                raise _lost_worker(run, error) from error
            finally:
                actions.close()
                run.writer.close()


def build_actions(run: Run) -> Actions:
    """The run's actions in their declared order (trainer/actions.py says why this order).

    The opt-in ones come from trainer/extras/ when the config asks for them; `config.actions`
    (the user's own) run last.
    """
    config = run.config
    order: list[Action] = [
        records.StepRecords(),
        monitoring.HealthMonitor(run),
        recovery.NonFiniteRecovery.from_run(run),
    ]
    if config.health.action == "rollback":
        order.append(recovery.Rollback.from_run(run))
    order.append(records.TrainRecords(run))
    if lr_control := features.if_asked("lr_control", config):
        order.append(lr_control.LRControlAction.from_run(run))
    if best := features.if_asked("best", config):
        order.append(best.BestAction.from_run(run))
    if profiling := features.if_asked("profiling", config):
        order.append(profiling.StepProfiler.from_run(run))
    order.append(watchdog.WatchdogAction.from_run(run))
    order.extend(load_user_action(entry, run) for entry in config.actions)
    order.append(lr_override.OverrideAction())  # Last: the final word on the LR (contract 4).
    return Actions(order)


def _lost_worker(run: Run, error: tf.errors.OpError) -> lost_worker.LostWorker:
    """What a surviving worker says when a collective failed because another worker is gone."""
    resolver = run.strategy.cluster_resolver
    complete = run.checkpointer.complete_steps()
    return lost_worker.from_error(
        error,
        own_task=(resolver.task_type, resolver.task_id),
        step=run.step,
        last_checkpoint=complete[0] if complete else None,
        collective_timeout_seconds=run.config.distribution.collective_timeout_seconds,
    )


def _train(run: Run, signals: preemption.SignalWatcher, actions: Actions) -> dict[str, float]:
    config = run.config
    # 5. The compiled inner loops and both inputs, built once (the train input is rebuilt only
    #    when a restore moves the input position back).
    loops = _Loops(run)
    eval_metrics: dict[str, float] = {}
    # 6. The outer loop: an inner loop of steps in one tf.function, then the actions. A signal
    #    received at any time (also during set-up or restore) stops it at the next boundary.
    while not run.done:
        _stop_if_signalled(run, signals, actions)
        decision = actions.after_train_loop(run, loops.train(actions))
        if decision.restore_lr_factor is not None:  # The loop is thrown away; replay from there.
            run.restore(decision.restore_lr_factor, decision.reason)
            loops.restart_input()
            actions.after_restore(run)
            continue
        if run.is_time(config.eval_every_steps):
            eval_metrics = loops.evaluate(actions)
            decision |= actions.after_eval(run, eval_metrics)
        decision |= actions.before_save(run)
        if decision.save or decision.stop or run.is_time(config.checkpoint_every_steps):
            _save(run, actions)
        if decision.stop:
            break
    # 7. What the run gives back (chief only): the last checkpoint as a model to serve
    #    (export/final); then the actions' own (the health report).
    if run.topology.is_chief and config.export_at_end:
        export.log_export(export.export_run(run.workdir))
    actions.at_end(run)
    return eval_metrics


def _stop_if_signalled(run: Run, signals: preemption.SignalWatcher, actions: Actions) -> None:
    """Preemption: once any worker got SIGTERM/SIGINT, checkpoint (unless this step already is)
    and raise `Preempted` on every worker (exit 42)."""
    if signals.should_stop(run.strategy, run.topology.num_workers):
        if run.last_saved_step != run.step:
            _save(run, actions)
        raise preemption.Preempted(run.step)


def _save(run: Run, actions: Actions) -> None:
    with actions.around(Phase("checkpoint save", run.step, run.plan_step)):
        run.save()
    actions.after_save(run)


class _Loops:
    """The compiled train and eval loops of a run, with their inputs."""

    def __init__(self, run: Run):
        setup, config, plan, state = run.setup, run.config, run.plan, run.state
        self._run = run
        self._train_loop = loop.make_train_loop(
            strategy=setup.strategy,
            model=state.model,
            optimizer=state.optimizer,
            global_batch_size=plan.global_batch_size,
            accumulation_steps=plan.accumulation_steps,
            grad_clip_norm=config.optimizer.grad_clip_norm,
            guard=state.guard,
            jit_compile=config.jit_compile,
            ema=state.ema,
            loss_scale=state.loss_scale,
        )
        self._eval_loop = loop.make_eval_loop(strategy=setup.strategy, model=state.model)
        self._eval_dataset, self._eval_steps = setup.eval_input()
        self.restart_input()

    def restart_input(self) -> None:
        """The train stream from the run's input position (after a restore moved it back)."""
        self._train_iterator = self._run.setup.train_iterator(self._run.examples_seen)

    def next_stop(self, actions: Actions) -> int:
        """The next plan step where the host must act; the inner loop runs exactly up to it."""
        run, config = self._run, self._run.config
        plan_step = run.plan_step
        stops = [run.plan.total_steps, plan_step + config.steps_per_loop]
        for every in (
            config.log_every_steps,
            config.eval_every_steps,
            config.checkpoint_every_steps,
        ):
            stops.append((plan_step // every + 1) * every)
        return min(stops + actions.next_stop(plan_step))

    def train(self, actions: Actions) -> LoopResult:
        """One inner loop up to the next stop; its outputs read with the loop's one host sync."""
        run = self._run
        plan_step = run.plan_step
        num_steps = self.next_stop(actions) - plan_step
        started = time.monotonic()
        with actions.around(Phase("train loop", run.step, plan_step, num_steps)):
            try:
                outputs = self._train_loop(self._train_iterator, tf.constant(num_steps))
                outputs = {k: v.numpy() for k, v in outputs.items()}  # The one host sync.
            except tf.errors.OpError as error:  # XLA compiles at the first call, not before.
                if run.config.jit_compile and (config_error := loop.xla_error(error)):
                    raise config_error from error
                raise
        seconds = time.monotonic() - started
        run.state.examples_seen.assign_add(num_steps * run.plan.global_batch_size)
        steps = outputs.pop("steps")
        return LoopResult(run.step - num_steps + 1, steps, outputs, seconds)

    def evaluate(self, actions: Actions) -> dict[str, float]:
        """One eval pass on the raw weights, and one on the EMA's when one is kept."""
        run = self._run
        with actions.around(Phase("eval loop", run.step, run.plan_step)):
            return loop.evaluate(
                self._eval_loop, self._eval_dataset, self._eval_steps, run.state.ema
            )

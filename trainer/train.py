"""`train_and_evaluate(config, workdir)`: the whole run, top to bottom."""

import dataclasses
import time
from contextlib import nullcontext

import ml_collections
import numpy as np
import tensorflow as tf

from trainer import (
    export,
    health,
    loop,
    lost_worker,
    lr_override,
    metrics,
    preemption,
    profiling,
    watchdog,
    workdir_lock,
)
from trainer import setup as setup_lib
from trainer.best import BestKeeper
from trainer.health import report
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
        health.check_config(config.health)
        watchdog.check_config(config.watchdog)
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
            profiler = profiling.StepProfiler.from_config(
                workdir, config, is_chief=setup.topology.is_chief
            )
            try:
                with watchdog.Watchdog.from_config(config.watchdog) as timer:
                    return _train(run, signals, profiler, timer)
            except lost_worker.LOST_CONTACT_ERRORS as error:
                if setup.topology.num_workers == 1:
                    raise
                raise _lost_worker(run, error) from error
            finally:
                profiler.stop()  # A run stopped inside profile_steps still writes its profile.
                run.writer.close()


def _lost_worker(run: Run, error: tf.errors.OpError) -> lost_worker.LostWorker:
    """What a surviving worker says when a collective failed because another worker is gone."""
    resolver = run.setup.strategy.cluster_resolver
    complete = run.checkpointer.complete_steps()
    return lost_worker.from_error(
        error,
        own_task=(resolver.task_type, resolver.task_id),
        step=run.step,
        last_checkpoint=complete[0] if complete else None,
        collective_timeout_seconds=run.config.distribution.collective_timeout_seconds,
    )


@dataclasses.dataclass
class _Window:
    """Train numbers accumulated on the host between two log records."""

    rows: list = dataclasses.field(default_factory=list)  # Per-update loop.SIGNALS rows.
    correct: float = 0.0  # Accuracy x updates.
    seconds: float = 0.0

    def add(self, outputs: dict, steps: np.ndarray, seconds: float) -> None:
        self.rows.append(steps)
        self.correct += float(outputs["accuracy"]) * len(steps)
        self.seconds += seconds

    def record(self, global_batch_size: int) -> dict[str, float]:
        """Means over the window's updates (the LR and the weight norm: of the last one)."""
        rows = np.concatenate(self.rows)
        column = {name: rows[:, i] for i, name in enumerate(loop.SIGNALS)}
        applied = column["skipped"] == 0
        ratios = column["update_norm"][applied] / column["param_norm"][applied]
        return {
            "learning_rate": float(column["learning_rate"][-1]),  # Applied in update `step`.
            "loss": float(column["loss"].mean()),
            "accuracy": self.correct / len(rows),
            "examples_per_sec": len(rows) * global_batch_size / self.seconds,
            "grad_norm": float(column["grad_norm"].mean()),
            "param_norm": float(column["param_norm"][-1]),
            "update_ratio": float(ratios.mean()) if len(ratios) else 0.0,
            "loss_max": float(column["loss"].max()),
        }


def _loss_scale_record(loss_scale) -> dict[str, float]:
    """mixed_float16's scale and its overflow skips so far (also in `skipped_updates`' rows)."""
    if loss_scale is None:
        return {}
    return {
        "loss_scale": float(loss_scale.scale.numpy()),
        "overflow_skips": int(loss_scale.skipped.numpy()),
    }


def _next_stop(plan_step: int, config: ml_collections.ConfigDict, total: int, milestone) -> int:
    """The next plan step where the host must act; the inner loop runs exactly up to it."""
    stops = [total, plan_step + config.steps_per_loop]
    for every in (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps):
        stops.append((plan_step // every + 1) * every)
    if milestone is not None and milestone > plan_step:
        stops.append(milestone)
    # The profiler starts and stops at loop boundaries: these make them the requested steps.
    stops.extend(step for step in config.profile_steps if step > plan_step)
    return min(stops)


def _train(
    run: Run,
    signals: preemption.SignalWatcher,
    profiler: profiling.StepProfiler,
    timer: watchdog.Watchdog,
) -> dict[str, float]:
    setup, config, plan, state = run.setup, run.config, run.plan, run.state
    # 5. The compiled inner loops and both inputs, built once (the train input is rebuilt only
    #    when a NaN recovery moves the input position back).
    train_loop = loop.make_train_loop(
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
    eval_loop = loop.make_eval_loop(strategy=setup.strategy, model=state.model)
    train_iterator = setup.train_iterator(run.examples_seen)
    eval_dataset, eval_steps = setup.eval_input()

    def evaluate() -> dict[str, float]:  # Raw weights, and the EMA's when one is kept.
        with timer.watch("eval loop", run.step):
            return loop.evaluate(eval_loop, eval_dataset, eval_steps, state.ema)

    def save() -> None:
        with timer.watch("checkpoint save", run.step):
            run.save()

    window = _Window()
    eval_metrics: dict[str, float] = {}
    num_workers = setup.topology.num_workers
    monitor = _monitor(run)
    # The best eval's checkpoint and export (export/best); file work, so the chief's alone.
    best = BestKeeper.from_config(run.workdir, config) if setup.topology.is_chief else None
    # 6. The outer loop: an inner loop of steps in one tf.function, then host-side work. A signal
    #    received at any time (also during set-up or restore) stops it at the next boundary.
    while run.plan_step < plan.total_steps:
        if signals.should_stop(setup.strategy, num_workers):
            if run.last_saved_step != run.step:
                save()
            raise preemption.Preempted(run.step)
        plan_step = run.plan_step
        stop = _next_stop(plan_step, config, plan.total_steps, run.controller.next_milestone())
        num_steps = stop - plan_step
        started = time.monotonic()
        # A profiler step inside profile_steps; the watchdog's timer always.
        with profiler.inner_loop(plan_step, num_steps), timer.watch("train loop", run.step):
            try:
                outputs = train_loop(train_iterator, tf.constant(num_steps))
                outputs = {k: v.numpy() for k, v in outputs.items()}  # The one host sync.
            except tf.errors.OpError as error:  # XLA compiles at the first call, not before.
                if config.jit_compile and (config_error := loop.xla_error(error)):
                    raise config_error from error
                raise
        seconds = time.monotonic() - started
        state.examples_seen.assign_add(num_steps * plan.global_batch_size)

        # Every update's signals, then the health rules over them (events reported at once).
        steps = outputs.pop("steps")
        first = run.step - num_steps + 1
        run.writer.write_steps(first, steps)
        found = monitor.observe(_columns(first, steps))
        for event in found:
            run.writer.write_event(event.step, event.record())
        applied = steps[:, loop.SIGNALS.index("skipped")] == 0
        nonfinite = ~np.isfinite(steps[:, :2]).all(axis=1)  # Loss or gradient norm.
        if (nonfinite & applied).any():  # Skipped updates left the weights as they were.
            run.log_events([run.recover_from_non_finite(float(outputs["loss"]))])
            train_iterator, window, monitor = _restart(run)
            continue
        spikes = [e for e in found if e.kind in ("spike", "explode")]
        if config.health.action == "rollback" and spikes:
            run.log_events([run.roll_back(spikes[0])])
            train_iterator, window, monitor = _restart(run)
            continue

        window.add(outputs, steps, seconds)
        plan_step = run.plan_step
        done = plan_step >= plan.total_steps
        events = run.controller.on_loop_end(run.step)

        if plan_step % config.log_every_steps == 0 or done:
            run.writer.write(
                run.step,
                {
                    **window.record(plan.global_batch_size),
                    "examples_seen": run.examples_seen,
                    "epoch": run.examples_seen / plan.train_examples,
                    "skipped_updates": int(state.guard.skipped.numpy()),
                    **_loss_scale_record(state.loss_scale),
                },
            )
            window = _Window()
        run.log_events(events)

        evaluated = plan_step % config.eval_every_steps == 0 or done
        if evaluated:
            eval_metrics = evaluate()
            run.writer.write(run.step, eval_metrics, kind="eval")
            run.log_events(run.controller.on_eval(run.step, eval_metrics))

        # The chief reads the override file and, on multi-worker runs, broadcasts it.
        override_events, overridden = run.take_lr_override()
        run.log_events(override_events)
        # With best_metric every eval is checkpointed (on every worker alike: a multi-worker
        # save is collective), so the best eval's checkpoint exists to be kept.
        keeps_best = evaluated and bool(config.best_metric)
        if plan_step % config.checkpoint_every_steps == 0 or done or overridden or keeps_best:
            save()
        if overridden and setup.topology.is_chief:  # Durable now: the file may leave the queue.
            lr_override.mark_applied(run.workdir, run.step)
        if keeps_best and best is not None:
            best.update(run.step, eval_metrics)
    # 7. What the run gives back (chief only): the last checkpoint as a model to serve
    #    (export/final), and the health report.
    if setup.topology.is_chief:
        if config.export_at_end:
            export.log_export(export.export_run(run.workdir))
        report.write(run.workdir)  # health.json, health.png and a console summary.
    return eval_metrics


def _columns(first: int, steps: np.ndarray) -> dict[str, np.ndarray]:
    """A loop's `[n, len(SIGNALS)]` matrix as named columns, with the update numbers."""
    return {
        "step": np.arange(first, first + len(steps)),
        **{name: steps[:, i] for i, name in enumerate(loop.SIGNALS)},
    }


def _monitor(run: Run) -> health.Monitor:
    """The health monitor, having seen this run's updates up to its step (none if fresh).

    Read from health_steps.jsonl, which every worker can see (a non-chief one may read before
    the chief truncated it on resume, hence the filter), so all workers decide alike.
    """
    plan, config = run.plan, run.config
    offset = run.plan_step - run.step

    def phase(step: int) -> str:
        return health.describe_phase(
            step + offset, plan.warmup_steps, plan.total_steps, config.lr.decay
        )

    monitor = health.Monitor(health.Rules.from_config(config.health), phase)
    history = metrics.read_steps(run.workdir)
    upto = history["step"] <= run.step
    monitor.replay({name: values[upto] for name, values in history.items()})
    return monitor


def _restart(run: Run):
    """Input, log window and monitor after a restore (NaN recovery, rollback)."""
    return run.setup.train_iterator(run.examples_seen), _Window(), _monitor(run)

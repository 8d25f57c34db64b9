"""The run's records as actions: every update's signals, the train record of each log window and
each eval's record (metrics.jsonl, health_steps.jsonl, TensorBoard; see metrics.MetricWriter).

Two actions because they sit at two places of the order (trainer/actions.py): `StepRecords`
first, so what later actions read is logged; `TrainRecords` after recovery, so a loop thrown
away by a restore never reaches a train record.
"""

import numpy as np

from trainer import loop, task
from trainer.actions import Action, LoopResult


class StepRecords(Action):
    """One record per update: health_steps.jsonl and a TensorBoard point per signal."""

    def after_train_loop(self, run, result: LoopResult) -> None:
        run.writer.write_steps(result.first_step, result.steps)


class _Window:
    """Train numbers accumulated on the host between two log records."""

    def __init__(self):
        self.rows: list[np.ndarray] = []  # Per-update loop.SIGNALS rows.
        self.metric_sums: dict[str, float] = {}  # Each task metric's mean x updates.
        self.seconds = 0.0

    def add(self, result: LoopResult, metric_names: tuple[str, ...]) -> None:
        self.rows.append(result.steps)
        for name in metric_names:
            weighted = float(result.means[name]) * len(result.steps)
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + weighted
        self.seconds += result.seconds

    def record(self, global_batch_size: int) -> dict[str, float]:
        """Means over the window's updates (the LR and the weight norm: of the last one)."""
        rows = np.concatenate(self.rows)
        column = {name: rows[:, i] for i, name in enumerate(loop.SIGNALS)}
        applied = column["skipped"] == 0
        ratios = column["update_norm"][applied] / column["param_norm"][applied]
        return {
            "learning_rate": float(column["learning_rate"][-1]),  # Applied in update `step`.
            "loss": float(column["loss"].mean()),
            **{name: total / len(rows) for name, total in self.metric_sums.items()},
            "examples_per_sec": len(rows) * global_batch_size / self.seconds,
            "grad_norm": float(column["grad_norm"].mean()),
            "param_norm": float(column["param_norm"][-1]),
            "update_ratio": float(ratios.mean()) if len(ratios) else 0.0,
            "loss_max": float(column["loss"].max()),
        }


class TrainRecords(Action):
    """The train record at every `log_every_steps` (and at the end); the eval record."""

    def __init__(self, run):
        self._window = _Window()
        self._metric_names = task.metric_names(run.num_classes)

    def after_train_loop(self, run, result: LoopResult) -> None:
        self._window.add(result, self._metric_names)
        if not run.is_time(run.config.log_every_steps):
            return
        state = run.state
        run.writer.write(
            run.step,
            {
                **self._window.record(run.plan.global_batch_size),
                "examples_seen": run.examples_seen,
                "epoch": run.examples_seen / run.plan.train_examples,
                "skipped_updates": int(state.guard.skipped.numpy()),
                **_loss_scale_record(state.loss_scale),
            },
        )
        self._window = _Window()

    def after_eval(self, run, eval_metrics: dict[str, float]) -> None:
        run.writer.write(run.step, eval_metrics, kind="eval")

    def after_restore(self, run) -> None:
        self._window = _Window()  # Its updates were thrown away with the loop.


def _loss_scale_record(loss_scale) -> dict[str, float]:
    """mixed_float16's scale and its overflow skips so far (also in `skipped_updates`' rows)."""
    if loss_scale is None:
        return {}
    return {
        "loss_scale": float(loss_scale.scale.numpy()),
        "overflow_skips": int(loss_scale.skipped.numpy()),
    }

"""The health monitor as an action: it sees every update of every inner loop, reports episodes
as they happen and writes the health report when the run ends (trainer/actions.py)."""

from trainer import health, metrics
from trainer.actions import Action, LoopResult
from trainer.health import report


class HealthMonitor(Action):
    """Runs `health.Monitor` on each loop's updates; its events go to the logs at once and onto
    the loop's result, where the recovery actions after it read them (rollback)."""

    def __init__(self, run):
        self._monitor = self._replayed(run)

    @staticmethod
    def _replayed(run) -> health.Monitor:
        """A monitor that has seen this run's updates up to its step (none if fresh).

        Read from health_steps.jsonl, which every worker can see (a non-chief one may read
        before the chief truncated it on resume, hence the filter), so all workers decide alike.
        """
        offset = run.plan_step - run.step

        def phase(step: int) -> str:  # Asked of the schedule, which knows its kinds.
            return run.setup.schedule.phase(step + offset)

        monitor = health.Monitor(health.Rules.from_config(run.config.health), phase)
        history = metrics.read_steps(run.workdir)
        upto = history["step"] <= run.step
        monitor.replay({name: values[upto] for name, values in history.items()})
        return monitor

    def after_train_loop(self, run, result: LoopResult) -> None:
        found = self._monitor.observe(result.columns())
        for event in found:
            marker = float(health.KINDS.index(event.kind) + 1)
            run.writer.write_event(event.step, event.record(), marker)
        result.events.extend(found)

    def after_restore(self, run) -> None:
        self._monitor = self._replayed(run)  # As an uninterrupted run from that step would.

    def at_end(self, run) -> None:
        if run.topology.is_chief:
            report.write(run.workdir)  # health.json, health.png and a console summary.

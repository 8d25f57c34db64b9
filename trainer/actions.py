"""The action seam: features run by the outer loop at fixed points, in one declared order.

The outer loop (`train.py`) knows no feature. After every inner loop it hands the loop's result
to each action in `ORDER`, then evaluates when it is time and hands the metrics on, then asks
whether to checkpoint, and so on; each hook may return a `Decision`. An action overrides only the
hooks it needs (the base class's do nothing):

  next_stop(plan_step)             a plan step the inner loop must stop at (milestones, profiler)
  around(phase)                    a context around each train loop, eval and save (watchdog)
  after_train_loop(run, result)    every inner loop's outputs (records, health, recovery, ...)
  after_eval(run, eval_metrics)    each eval's metrics (plateau, best, a custom evaluation)
  before_save(run)                 last word at each boundary: may ask for a save (LR override)
  after_save(run)                  the checkpoint of this boundary is durable now
  after_restore(run)               the run went back to a checkpoint (NaN recovery, rollback)
  at_end(run)                      the plan is done (health report)
  close()                          always, also after an error (profiler, watchdog)

Why the order is a contract (each line is something a test holds):
  1. records before health: the monitor and recovery read the steps that are logged;
  2. recovery before everything that logs or decides on a loop's outputs: a restore throws that
     loop away, so no later action sees it (the chain stops at the first restore);
  3. LR control after the train record: the record carries the LR its updates applied;
  4. the override last, in `before_save`: it has the last word on the LR at a boundary, and it
     counts as applied only in `after_save`, once a checkpoint holds it (exact resume);
  5. best after the save: it copies the checkpoint of the step it judged.

A fork adds its own action in one config entry, `config.actions = ("my_module:MyAction",)`: each
entry names a callable that takes the run and returns an `Action`; they run after the built-in
ones (README, "Forking", has an example).
"""

import contextlib
import dataclasses
import importlib
from collections.abc import Iterator

import numpy as np

from trainer.errors import ConfigError
from trainer.loop import SIGNALS


@dataclasses.dataclass(frozen=True)
class Decision:
    """What an action asks the outer loop for; `Decision()` asks for nothing.

    save: checkpoint at this boundary even if it is not time (every worker must agree).
    restore_lr_factor: go back to the newest complete checkpoint and multiply the LR by this
      factor; `reason` says why, in the LR event.
    stop: end training at this boundary, with a checkpoint (the run completes normally).
    """

    save: bool = False
    restore_lr_factor: float | None = None
    reason: str = ""
    stop: bool = False

    def __or__(self, other: "Decision | None") -> "Decision":
        if other is None:
            return self
        restore = self if self.restore_lr_factor is not None else other
        return Decision(
            save=self.save or other.save,
            restore_lr_factor=restore.restore_lr_factor,
            reason=restore.reason,
            stop=self.stop or other.stop,
        )


@dataclasses.dataclass
class LoopResult:
    """One inner loop's outputs, as the host sees them after its one sync.

    first_step: the optimizer step of the loop's first update (1-based, as in metrics.jsonl).
    steps: the `[n, len(loop.SIGNALS)]` per-update signals.
    means: the loop's mean loss, mean of each `task.metrics`, and the last applied LR.
    events: what earlier actions found in it (health events), for later ones to act on.
    """

    first_step: int
    steps: np.ndarray
    means: dict[str, float]
    seconds: float
    events: list = dataclasses.field(default_factory=list)

    def column(self, name: str) -> np.ndarray:
        return self.steps[:, SIGNALS.index(name)]

    def columns(self) -> dict[str, np.ndarray]:
        """Named columns with the update numbers, as `metrics.read_steps` returns them."""
        return {
            "step": np.arange(self.first_step, self.first_step + len(self.steps)),
            **{name: self.steps[:, i] for i, name in enumerate(SIGNALS)},
        }


@dataclasses.dataclass(frozen=True)
class Phase:
    """What `Action.around` wraps: a "train loop", "eval loop" or "checkpoint save"."""

    what: str
    step: int
    plan_step: int
    num_steps: int = 0


class Action:
    """A feature at the outer loop's fixed points; override the hooks you need."""

    def next_stop(self, plan_step: int) -> int | None:
        del plan_step
        return None

    def around(self, phase: Phase) -> contextlib.AbstractContextManager:
        del phase
        return contextlib.nullcontext()

    def after_train_loop(self, run, result: LoopResult) -> Decision | None:
        del run, result

    def after_eval(self, run, eval_metrics: dict[str, float]) -> Decision | None:
        del run, eval_metrics

    def before_save(self, run) -> Decision | None:
        del run

    def after_save(self, run) -> None:
        del run

    def after_restore(self, run) -> None:
        del run

    def at_end(self, run) -> None:
        del run

    def close(self) -> None:
        pass


class Actions:
    """The actions of a run in their order; each hook runs them all, first to last."""

    def __init__(self, actions: list[Action]):
        self.actions = actions

    def next_stop(self, plan_step: int) -> list[int]:
        stops = (action.next_stop(plan_step) for action in self.actions)
        return [stop for stop in stops if stop is not None and stop > plan_step]

    @contextlib.contextmanager
    def around(self, phase: Phase) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for action in self.actions:
                stack.enter_context(action.around(phase))
            yield

    def after_train_loop(self, run, result: LoopResult) -> Decision:
        """The chain stops at the first restore: the actions after it never see this loop."""
        decision = Decision()
        for action in self.actions:
            decision |= action.after_train_loop(run, result)
            if decision.restore_lr_factor is not None:
                break
        return decision

    def after_eval(self, run, eval_metrics: dict[str, float]) -> Decision:
        return self._decide("after_eval", run, eval_metrics)

    def before_save(self, run) -> Decision:
        return self._decide("before_save", run)

    def _decide(self, hook: str, *args) -> Decision:
        decision = Decision()
        for action in self.actions:
            decision |= getattr(action, hook)(*args)
        return decision

    def after_save(self, run) -> None:
        for action in self.actions:
            action.after_save(run)

    def after_restore(self, run) -> None:
        for action in self.actions:
            action.after_restore(run)

    def at_end(self, run) -> None:
        for action in self.actions:
            action.at_end(run)

    def close(self) -> None:
        """Every action's `close`, even if one fails (the first error is raised after)."""
        with contextlib.ExitStack() as stack:
            for action in reversed(self.actions):
                stack.callback(action.close)


def user_action_factory(entry: str):
    """The callable a `config.actions` entry "package.module:factory" names (config_check checks
    every entry with this at start-up, so a typo fails before anything is written).

    Raises:
      ConfigError: the entry is malformed, its module cannot be imported or has no such name.
    """
    module_name, _, name = entry.partition(":")
    hint = 'each entry of config.actions is "package.module:factory", e.g. "my_logger:Logger"'
    if not module_name or not name:
        raise ConfigError(f"config.actions entry {entry!r} has no ':'; {hint}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"config.actions entry {entry!r}: cannot import {module_name} ({error}); put it on "
            "PYTHONPATH or fix the name"
        ) from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"config.actions entry {entry!r}: {module_name} has no callable {name}")
    return factory


def load_user_action(entry: str, run) -> Action:
    """`config.actions` entry "package.module:factory" -> `factory(run)`."""
    return user_action_factory(entry)(run)

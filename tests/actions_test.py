"""Tests for trainer/actions.py and the order train.build_actions declares: the seam a fork
adds its own code through, and the order the run's guarantees rest on."""

import types

import numpy as np
import pytest
import testutil

from trainer import actions, config_check, lr_override, metrics, records, recovery, train, watchdog
from trainer.actions import Action, Decision
from trainer.errors import ConfigError
from trainer.extras import best, lr_control, profiling
from trainer.health import monitoring


def test_decisions_combine_save_and_stop_and_keep_the_first_restore():
    first = Decision(restore_lr_factor=0.5, reason="first")
    assert (Decision(save=True) | Decision(stop=True)) == Decision(save=True, stop=True)
    assert (first | Decision(restore_lr_factor=0.1, reason="later")) == first
    assert (Decision() | first | None) == first


class _Recorder(Action):
    def __init__(self, seen, decision=None):
        self.seen, self.decision = seen, decision

    def after_train_loop(self, run, result):
        self.seen.append(self)
        return self.decision


def test_the_first_restore_ends_the_chain_after_a_train_loop():
    seen = []
    restore = _Recorder(seen, Decision(restore_lr_factor=0.5, reason="test"))
    chain = actions.Actions([_Recorder(seen, Decision(save=True)), restore, _Recorder(seen)])
    decision = chain.after_train_loop(None, None)
    assert seen == chain.actions[:2]  # The third never saw the loop that is thrown away.
    assert decision == Decision(save=True, restore_lr_factor=0.5, reason="test")


def _fake_run(tmp_path, **fields):
    """What build_actions and the built-in actions read of a run, for a fresh chief."""
    config = testutil.config_with(**fields)
    plan = types.SimpleNamespace(warmup_steps=50, total_steps=600, milestones=(100,))
    return types.SimpleNamespace(
        config=config,
        plan=plan,
        step=0,
        plan_step=0,
        workdir=str(tmp_path),
        num_classes=10,
        schedule=types.SimpleNamespace(state=None),
        state=types.SimpleNamespace(lr_control=None),
        topology=types.SimpleNamespace(is_chief=True, num_workers=1, worker_index=0),
    )


def test_build_actions_declares_the_order_the_guarantees_rest_on(tmp_path):
    run = _fake_run(
        tmp_path,
        **{
            "health.action": "rollback",
            "lr.milestones": (100,),
            "lr.milestone_values": (0.1,),
            "best_metric": "eval_accuracy",
            "profile_steps": (10, 20),
            "actions": ("actions_test:user_action",),
        },
    )
    built = train.build_actions(run)
    try:
        assert [type(a) for a in built.actions] == [
            records.StepRecords,  # 1. What later actions read is logged first.
            monitoring.HealthMonitor,
            recovery.NonFiniteRecovery,  # 2. Before anything logs or decides on a loop...
            recovery.Rollback,  # ...after the monitor whose events it reads.
            records.TrainRecords,
            lr_control.LRControlAction,  # 3. After the train record of the LR it applied.
            best.BestAction,
            profiling.StepProfiler,
            watchdog.WatchdogAction,
            _UserAction,  # The user's own, after the built-in ones...
            lr_override.OverrideAction,  # 4. ...but the override has the last word.
        ]
    finally:
        built.close()


def test_the_default_config_runs_no_extra(tmp_path):
    built = train.build_actions(_fake_run(tmp_path))
    try:
        assert not any(type(a).__module__.startswith("trainer.extras") for a in built.actions)
    finally:
        built.close()


class _UserAction(Action):
    """A user's action as a fork writes it: it sees every inner loop and eval, and may stop."""

    def __init__(self, run, stop_at_eval=None):
        self.loops, self.evals, self.saves = [], [], []
        self.stop_at_eval = stop_at_eval
        _UserAction.last = self

    def after_train_loop(self, run, result):
        self.loops.append((result.first_step, len(result.steps), sorted(result.means)))

    def after_eval(self, run, eval_metrics):
        self.evals.append((run.step, eval_metrics))
        if run.step == self.stop_at_eval:
            return Decision(stop=True)
        return None

    def after_save(self, run):
        self.saves.append(run.step)


def user_action(run):
    return _UserAction(run)


def early_stop(run):
    return _UserAction(run, stop_at_eval=10)


def test_a_user_action_sees_every_loop_and_eval_and_can_stop_the_run(tmp_path, data_dir):
    config = testutil.tiny_run_config(data_dir, actions=("actions_test:early_stop",))
    final = train.train_and_evaluate(config, str(tmp_path))  # 20 steps; the action stops at 10.
    action = _UserAction.last
    assert [(first, n) for first, n, _ in action.loops] == [(1, 5), (6, 5)]
    assert action.loops[0][2] == ["accuracy", "learning_rate", "loss"]
    assert [step for step, _ in action.evals] == [10]
    assert final == action.evals[0][1]
    assert action.saves == [10]  # Stopped with a checkpoint, as a finished run ends.
    assert [r["step"] for r in metrics.read_records(str(tmp_path)) if "eval_loss" in r] == [10]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("actions_test.user_action", "has no ':'"),
        ("no_such_module_here:factory", "cannot import no_such_module_here"),
        ("actions_test:no_such_factory", "actions_test has no callable no_such_factory"),
    ],
)
def test_a_bad_user_action_entry_is_one_line_at_start_up(entry, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        config_check.check_config(testutil.config_with(actions=(entry,)))
    assert "\n" not in str(error.value)


def test_non_finite_recovery_counts_only_applied_updates():
    result = actions.LoopResult(1, np.array([[np.nan, 1, 1, 0, 0.1, 1.0]]), {"loss": np.nan}, 0)
    assert (
        recovery.NonFiniteRecovery(policy="fail", lr_factor=0.5, max_recoveries=1).after_train_loop(
            None, result
        )
        is None
    )  # The NaN update was skipped: nothing to undo.

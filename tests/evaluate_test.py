"""Standalone evaluator: the trainer's eval numbers for a run's checkpoints, while it trains."""

import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf
import testutil

from trainer import checkpointing, evaluate, loop, train, workdir_lock
from trainer import setup as setup_lib
from trainer import state as state_lib

TOTAL = 20


def _config(data_dir, **fields):
    return testutil.tiny_run_config(data_dir, **{"total_steps": TOTAL, **fields})


class _Trainer:
    """The trainer's state, checkpointed at chosen steps with distinct weights (no training)."""

    def __init__(self, data_dir):
        self.setup = setup_lib.prepare(_config(data_dir))
        self.state = state_lib.build_state(self.setup)
        self._eval_loop = loop.make_eval_loop(strategy=self.setup.strategy, model=self.state.model)

    def into(self, workdir) -> "_Trainer":
        """From now on saves into `workdir`."""
        self.checkpointer = checkpointing.Checkpointer(
            self.state.checkpoint, str(workdir), is_chief=True, worker_index=0, max_to_keep=3
        )
        return self

    def save_at(self, step: int) -> dict[str, float]:
        """Checkpoints weights moved by `step`; returns what the trainer's eval says of them."""
        for variable in self.state.model.trainable_variables:
            variable.assign_add(tf.fill(variable.shape, 0.001 * step))
        self.state.optimizer.iterations.assign(step)
        self.state.examples_seen.assign(step * self.setup.plan.global_batch_size)
        self.checkpointer.save(state_lib.manifest(self.setup, self.state))
        dataset, steps = self.setup.eval_input()
        outputs = self._eval_loop(iter(dataset), tf.constant(steps))
        return {k: float(v.numpy()) for k, v in outputs.items()}


@pytest.fixture(scope="module")
def shared_trainer(data_dir):
    return _Trainer(data_dir)


@pytest.fixture
def trainer(shared_trainer, tmp_path):
    return shared_trainer.into(tmp_path)


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, evaluate.RESULTS_FILE)) as f:
        return [json.loads(line) for line in f]


def test_evaluates_the_newest_checkpoint_as_the_trainer_does_and_records_it(tmp_path, trainer):
    trainer.save_at(0)
    expected = trainer.save_at(10)
    before = sorted(os.listdir(trainer.checkpointer.directory))
    # A trainer holds the workdir: the evaluator needs no lock and writes no checkpoint.
    with workdir_lock.WorkdirLock(str(tmp_path)):
        step, metrics = evaluate.evaluate_latest(str(tmp_path))
    assert step == 10
    assert metrics == pytest.approx(expected, rel=1e-6)
    assert sorted(os.listdir(trainer.checkpointer.directory)) == before
    (record,) = _records(tmp_path)
    assert record["step"] == 10 and record["checkpoint"] == "ckpt-10"
    assert record["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    events = tf.io.gfile.glob(os.path.join(tmp_path, evaluate.TENSORBOARD_RUN, "events.*"))
    assert events


def test_watch_picks_up_a_checkpoint_written_while_it_watches(tmp_path, trainer, monkeypatch):
    first = trainer.save_at(10)
    written = {}
    real_sleep = time.sleep

    def trainer_saves_while_evaluator_waits(seconds):
        if not written:  # The evaluator has evaluated ckpt-10 and is polling for the next one.
            assert [r["step"] for r in _records(tmp_path)] == [10]
            written["last"] = trainer.save_at(TOTAL)  # The run's last checkpoint.
        real_sleep(seconds)

    monkeypatch.setattr(evaluate.time, "sleep", trainer_saves_while_evaluator_waits)
    results = evaluate.watch(str(tmp_path), timeout=60, poll_seconds=0.01)
    assert [step for step, _ in results] == [10, TOTAL]  # Stopped: TOTAL completes the plan.
    assert results[0][1] == pytest.approx(first, rel=1e-6)
    assert results[1][1] == pytest.approx(written["last"], rel=1e-6)
    assert [r["step"] for r in _records(tmp_path)] == [10, TOTAL]


def test_watch_stops_after_the_timeout_and_continues_after_the_last_recorded_step(
    tmp_path, trainer
):
    trainer.save_at(10)
    assert [s for s, _ in evaluate.watch(str(tmp_path), timeout=0.3, poll_seconds=0.05)] == [10]
    started = time.monotonic()
    assert evaluate.watch(str(tmp_path), timeout=0.3, poll_seconds=0.05) == []  # Nothing new.
    assert time.monotonic() - started < 30


def test_watch_skips_a_checkpoint_pruned_before_it_was_read(tmp_path, trainer, monkeypatch):
    trainer.save_at(10)
    trainer.save_at(TOTAL)
    restore = checkpointing.Checkpointer.restore

    def pruned_first(self, step, expected):
        if step == TOTAL:
            raise checkpointing.CheckpointError(f"ckpt-{step} is not a complete checkpoint")
        return restore(self, step, expected)

    monkeypatch.setattr(checkpointing.Checkpointer, "restore", pruned_first)
    assert evaluate.watch(str(tmp_path), timeout=0.3, poll_seconds=0.05) == []


def test_no_checkpoint_is_an_error_naming_the_directory(tmp_path):
    with pytest.raises(checkpointing.CheckpointError, match="no complete checkpoint in"):
        evaluate.evaluate_latest(str(tmp_path))


@pytest.mark.slow  # A real (tiny) training run in-process: ~10-20 s.
def test_reproduces_the_trainers_final_eval_of_a_finished_run(tmp_path, data_dir):
    final = train.train_and_evaluate(_config(data_dir), str(tmp_path))
    step, metrics = evaluate.evaluate_latest(str(tmp_path))
    assert step == TOTAL
    assert metrics.keys() == final.keys()
    for name in final:
        np.testing.assert_allclose(metrics[name], final[name], rtol=1e-6, err_msg=name)

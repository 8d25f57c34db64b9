"""Best checkpoint: the best eval's checkpoint and export kept in export/best/, across resumes."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import testutil

from trainer import checkpointing, config_check, export, features
from trainer import setup as setup_lib
from trainer import state as state_lib
from trainer.errors import ConfigError
from trainer.extras import best


@pytest.fixture(scope="module")
def trainer_state(data_dir):
    config = testutil.config_with(
        **{
            "model.name": "mlp",
            "model.width": 8,
            "distribution.strategy": "default",
            "dataset.data_dir": data_dir,
        }
    )
    setup = setup_lib.prepare(config)
    return setup, state_lib.build_state(setup)


class _Run:
    """Saves the trainer's state at chosen steps; the first weight holds the step."""

    def __init__(self, workdir, trainer_state, max_to_keep: int = 10):
        self.workdir = str(workdir)
        self.setup, self.state = trainer_state
        self.checkpointer = checkpointing.Checkpointer(
            self.state.checkpoint,
            self.workdir,
            is_chief=True,
            worker_index=0,
            max_to_keep=max_to_keep,
        )

    def save_at(self, step: int) -> None:
        first = self.state.model.weights[0]
        first.assign(np.full(first.shape, float(step), np.float32))
        self.state.optimizer.iterations.assign(step)
        self.checkpointer.save(state_lib.manifest(self.setup, self.state))


def _keeper(workdir, metric="eval_accuracy", mode="max") -> best.BestKeeper:
    return best.BestKeeper(str(workdir), metric=metric, mode=mode)


def _best_json(workdir) -> dict:
    with open(os.path.join(workdir, "export", "best", best.BEST_FILE)) as f:
        return json.load(f)


def _first_weight(prefix: str) -> float:
    """The first model weight of the checkpoint at `prefix`, read as plain TF would."""
    model = export.load_model(prefix, checkpointing.read_manifest(prefix))
    return float(model.weights[0].numpy().flat[0])


@pytest.mark.parametrize(
    "metric, mode, error",
    [
        ("", "max", None),
        ("eval_accuracy", "max", None),
        ("eval_loss", "min", None),
        ("accuracy", "max", "not an eval metric"),
        ("eval_loss", "up", "not one of max, min"),
        ("eval_accuracy", "min", "would keep the worst eval_accuracy.*best_mode=max"),
        ("eval_loss", "max", "would keep the worst eval_loss.*best_mode=min"),
    ],
)
def test_check_config(metric, mode, error):
    config = testutil.config_with(best_metric=metric, best_mode=mode)
    if error is None:
        config_check.check_config(config)
    else:
        with pytest.raises(ConfigError, match=error):
            config_check.check_config(config)


def test_off_by_default():
    assert not features.asked("best", testutil.config_with())


def test_keeps_the_best_eval_with_its_checkpoint_and_export(tmp_path, trainer_state):
    run = _Run(tmp_path, trainer_state)
    keeper = _keeper(tmp_path)
    decisions = []
    for step, accuracy in ((10, 0.5), (20, 0.4), (30, 0.7), (40, 0.7)):  # 40 ties: not better.
        run.save_at(step)
        decisions.append(
            keeper.update(step, {"eval_loss": 1 - accuracy, "eval_accuracy": accuracy})
        )
    assert decisions == [True, False, True, False]
    record = _best_json(tmp_path)
    assert (record["metric"], record["mode"], record["value"], record["step"]) == (
        "eval_accuracy",
        "max",
        0.7,
        30,
    )
    directory = os.path.join(tmp_path, "export", "best")
    assert {"saved_model.pb", "model.keras", "export.json", "checkpoint"} <= set(
        os.listdir(directory)
    )
    prefix = tf.train.latest_checkpoint(os.path.join(directory, "checkpoint"))
    assert prefix == os.path.join(directory, "checkpoint", "ckpt-30")
    assert _first_weight(prefix) == 30.0  # The weights of step 30, not of the newest (40).
    assert checkpointing.find_checkpoint(prefix)[1].step == 30  # Usable as init_checkpoint.
    assert "serving_default" in tf.saved_model.load(directory).signatures


def test_kept_across_a_resume(tmp_path, trainer_state):
    run = _Run(tmp_path, trainer_state)
    run.save_at(10)
    _keeper(tmp_path, "eval_loss", "min").update(10, {"eval_loss": 0.3, "eval_accuracy": 0.9})

    resumed = _keeper(tmp_path, "eval_loss", "min")  # A new process reads best.json.
    assert resumed.best["value"] == 0.3 and resumed.best["step"] == 10
    run.save_at(20)
    assert not resumed.update(20, {"eval_loss": 0.3, "eval_accuracy": 0.9})  # Replayed: a tie.
    assert not resumed.update(20, {"eval_loss": 0.5, "eval_accuracy": 0.9})
    assert _best_json(tmp_path)["step"] == 10
    run.save_at(30)
    assert resumed.update(30, {"eval_loss": 0.2, "eval_accuracy": 0.9})
    assert _best_json(tmp_path)["step"] == 30


def test_a_nan_eval_is_never_best(tmp_path):
    keeper = _keeper(tmp_path, "eval_loss", "min")
    assert not keeper.improves({"eval_loss": float("nan"), "eval_accuracy": 0.0})
    assert keeper.improves({"eval_loss": 5.0, "eval_accuracy": 0.0})


def test_another_metric_starts_over_with_a_warning(tmp_path, trainer_state, caplog):
    run = _Run(tmp_path, trainer_state)
    run.save_at(10)
    _keeper(tmp_path).update(10, {"eval_loss": 0.3, "eval_accuracy": 0.9})
    keeper = _keeper(tmp_path, "eval_loss", "min")
    assert keeper.best is None
    assert "of an earlier setting" in caplog.text


def test_an_interrupted_replacement_is_undone(tmp_path, trainer_state):
    run = _Run(tmp_path, trainer_state)
    run.save_at(10)
    _keeper(tmp_path).update(10, {"eval_loss": 0.3, "eval_accuracy": 0.9})
    directory = os.path.join(tmp_path, "export", "best")
    os.rename(directory, directory + ".old")  # Killed between the two renames.
    os.makedirs(directory + ".staging")  # ...with a half-written successor.
    keeper = _keeper(tmp_path)
    assert keeper.best["step"] == 10
    assert sorted(os.listdir(os.path.join(tmp_path, "export"))) == ["best"]


def test_the_best_outlives_retention_of_the_run_checkpoints(tmp_path, trainer_state):
    run = _Run(tmp_path, trainer_state, max_to_keep=1)
    run.save_at(10)
    keeper = _keeper(tmp_path)
    keeper.update(10, {"eval_loss": 0.1, "eval_accuracy": 0.9})
    run.save_at(20)
    assert run.checkpointer.complete_steps() == [20]
    assert os.path.exists(os.path.join(tmp_path, "export", "best", "checkpoint", "ckpt-10.index"))


def test_the_evaluated_step_must_be_checkpointed_first(tmp_path, trainer_state):
    _Run(tmp_path, trainer_state).save_at(10)
    with pytest.raises(checkpointing.CheckpointError, match="no complete checkpoint at step 15"):
        _keeper(tmp_path).update(15, {"eval_loss": 0.1, "eval_accuracy": 0.9})

"""Checkpoints: the manifest as commit marker, fallbacks, refusals, and what gets saved."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import checkpointing


def _model(width: int = 4, dropout: float = 0.0) -> keras.Model:
    layers = [keras.Input((3,)), keras.layers.Dense(width)]
    if dropout:
        layers.append(keras.layers.Dropout(dropout, seed=1))
    return keras.Sequential([*layers, keras.layers.Dense(2)])


def _manifest(model: keras.Model, step: int) -> checkpointing.Manifest:
    return checkpointing.Manifest(
        step=step,
        examples_seen=step * 8,
        model="mlp",
        model_variables=[list(v.shape) for v in model.weights],
        optimizer="sgd",
        plan={},
        config={},
        versions={},
    )


class _Run:
    """A model whose weights encode the step, saved through a Checkpointer."""

    def __init__(self, workdir, width: int = 4, max_to_keep: int = 5):
        self.model = _model(width)
        self.step = tf.Variable(0, dtype=tf.int64)
        checkpoint = tf.train.Checkpoint(model=self.model, step=self.step)
        self.checkpointer = checkpointing.Checkpointer(
            checkpoint, str(workdir), is_chief=True, worker_index=0, max_to_keep=max_to_keep
        )

    def save_at(self, step: int) -> str:
        self.step.assign(step)
        for variable in self.model.weights:
            variable.assign(np.full(variable.shape, float(step), np.float32))
        return self.checkpointer.save(_manifest(self.model, step))

    def restore(self) -> int | None:
        self.step.assign(-1)
        manifest = self.checkpointer.restore_latest(_manifest(self.model, 0))
        return None if manifest is None else int(self.step.numpy())


def test_empty_workdir_restores_nothing(tmp_path):
    assert _Run(tmp_path).restore() is None


def test_restores_the_newest_complete_checkpoint_with_its_values(tmp_path):
    run = _Run(tmp_path)
    for step in (10, 20, 30):
        run.save_at(step)
    fresh = _Run(tmp_path)
    assert fresh.restore() == 30
    assert all(np.all(v.numpy() == 30.0) for v in fresh.model.weights)


def test_prunes_to_max_to_keep(tmp_path):
    run = _Run(tmp_path, max_to_keep=2)
    for step in (10, 20, 30):
        run.save_at(step)
    assert run.checkpointer.complete_steps() == [30, 20]
    assert not [f for f in os.listdir(run.checkpointer.directory) if f.startswith("ckpt-10")]


def test_a_save_without_manifest_is_never_latest(tmp_path):
    run = _Run(tmp_path)
    run.save_at(10)
    run.save_at(20)
    os.remove(os.path.join(run.checkpointer.directory, "ckpt-20.manifest.json"))  # Killed mid-save.
    assert _Run(tmp_path).restore() == 10


@pytest.mark.parametrize("damage", ["truncate_data", "garbage_index", "garbage_manifest"])
def test_damaged_latest_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    run = _Run(tmp_path)
    run.save_at(10)
    prefix = run.save_at(20)
    if damage == "truncate_data":
        data_file = [f for f in os.listdir(run.checkpointer.directory) if "ckpt-20.data" in f][0]
        with open(os.path.join(run.checkpointer.directory, data_file), "r+b") as f:
            f.truncate(3)
    elif damage == "garbage_index":
        with open(prefix + ".index", "wb") as f:
            f.write(b"not a checkpoint index")
    else:
        with open(prefix + ".manifest.json", "w") as f:
            f.write("{half a json")
    fresh = _Run(tmp_path)
    assert fresh.restore() == 10
    assert all(np.all(v.numpy() == 10.0) for v in fresh.model.weights)
    assert "ckpt-20" in caplog.text


@pytest.mark.parametrize("state_file", ["", "garbage !!", 'model_checkpoint_path: "ckpt-999"'])
def test_tf_state_file_is_not_trusted(tmp_path, state_file):
    run = _Run(tmp_path)
    run.save_at(10)
    with open(os.path.join(run.checkpointer.directory, "checkpoint"), "w") as f:
        f.write(state_file)
    assert _Run(tmp_path).restore() == 10


def test_checkpoints_that_cannot_be_read_fail_loudly(tmp_path):
    run = _Run(tmp_path)
    prefix = run.save_at(10)
    with open(prefix + ".index", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(checkpointing.CheckpointError, match="none can be read"):
        _Run(tmp_path).restore()


def test_only_partial_saves_fail_loudly(tmp_path):
    run = _Run(tmp_path)
    run.save_at(10)
    os.remove(os.path.join(run.checkpointer.directory, "ckpt-10.manifest.json"))
    with pytest.raises(checkpointing.CheckpointError, match="move the directory away"):
        _Run(tmp_path).restore()


def test_checkpoint_of_another_model_is_refused_with_what_differs(tmp_path):
    _Run(tmp_path, width=4).save_at(10)
    with pytest.raises(checkpointing.CheckpointError, match=r"\[3, 4\] vs \[3, 8\].*new --workdir"):
        _Run(tmp_path, width=8).restore()


def test_non_chief_save_leaves_no_checkpoint_and_no_scratch(tmp_path):
    model = _model()
    checkpointer = checkpointing.Checkpointer(
        tf.train.Checkpoint(model=model),
        str(tmp_path),
        is_chief=False,
        worker_index=1,
        max_to_keep=3,
    )
    checkpointer.save(_manifest(model, 5))
    assert checkpointer.complete_steps() == []
    assert not (tmp_path / "tmp_worker_1").exists()


def test_dropout_rng_state_is_saved_so_masks_continue(tmp_path):
    def masks(model, count):
        return [model(tf.ones((2, 3)), training=True).numpy() for _ in range(count)]

    keras.utils.set_random_seed(0)
    model = _model(dropout=0.5)
    states = checkpointing.seed_generator_states(model)
    assert len(states) == 1
    checkpoint = tf.train.Checkpoint(model=model, rng=states)
    masks(model, 2)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    expected = masks(model, 3)

    checkpoint.read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(masks(model, 3), expected)

"""Checkpoints: the manifest as commit marker, fallbacks, refusals, and what gets saved."""

import dataclasses
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

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


# ---------------------------------------------------------------------------------------------
# TF's `checkpoint` state file: written after the manifest, for other tools; never trusted here.


def test_state_file_names_the_complete_checkpoints_for_other_tools(tmp_path):
    run = _Run(tmp_path, max_to_keep=2)
    for step in (10, 20, 30):
        run.save_at(step)
    directory = run.checkpointer.directory
    state = tf.train.get_checkpoint_state(directory)
    assert state.model_checkpoint_path == os.path.join(directory, "ckpt-30")
    assert list(state.all_model_checkpoint_paths) == [
        os.path.join(directory, f"ckpt-{step}") for step in (20, 30)
    ]
    assert tf.train.latest_checkpoint(directory) == os.path.join(directory, "ckpt-30")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(), directory, max_to_keep=5)
    assert manager.checkpoints == [os.path.join(directory, f"ckpt-{s}") for s in (20, 30)]


def test_state_file_never_names_a_save_that_did_not_finish(tmp_path):
    run = _Run(tmp_path)
    run.save_at(10)
    # A save killed after writing its data, before its manifest (the commit marker).
    tf.train.Checkpoint(model=run.model).write(os.path.join(run.checkpointer.directory, "ckpt-20"))
    assert tf.train.latest_checkpoint(run.checkpointer.directory).endswith("ckpt-10")


def test_a_failed_state_file_write_is_a_warning_and_the_save_stands(tmp_path, monkeypatch, caplog):
    def failing(directory, steps):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpointing, "write_state_file", failing)
    run = _Run(tmp_path)
    run.save_at(10)
    assert "cannot update" in caplog.text and "No space left" in caplog.text
    assert _Run(tmp_path).restore() == 10


_PLAIN_TF_READER = """
import sys
import keras, tensorflow as tf
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
prefix = tf.train.latest_checkpoint(sys.argv[1])
tf.train.Checkpoint(model=model).read(prefix).expect_partial().assert_existing_objects_matched()
print(prefix, sorted({float(v.numpy().flat[0]) for v in model.weights}))
"""


@pytest.mark.slow  # A fresh TensorFlow process: ~10 s of imports.
def test_plain_tensorflow_restores_the_model_in_a_fresh_process(tmp_path):
    run = _Run(tmp_path)
    for step in (10, 20):
        run.save_at(step)
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN_TF_READER, run.checkpointer.directory],
        env=testutil.ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    prefix, values = result.stdout.strip().split(" ", 1)
    assert prefix == os.path.join(run.checkpointer.directory, "ckpt-20")
    assert values == "[20.0]"  # Every weight holds the step it was saved at.


# ---------------------------------------------------------------------------------------------
# Read-only use by tools (evaluator, export, fine-tuning).


def test_restore_reads_the_asked_step_with_no_fallback(tmp_path):
    run = _Run(tmp_path)
    for step in (10, 20):
        run.save_at(step)
    fresh = _Run(tmp_path)
    fresh.checkpointer.restore(10, _manifest(fresh.model, 0))
    assert int(fresh.step.numpy()) == 10
    os.remove(os.path.join(run.checkpointer.directory, "ckpt-20.manifest.json"))
    with pytest.raises(checkpointing.CheckpointError, match="ckpt-20 is not a complete"):
        fresh.checkpointer.restore(20, _manifest(fresh.model, 0))


def test_read_only_checkpointer_creates_nothing_and_refuses_to_save(tmp_path):
    model = _model()
    checkpointer = checkpointing.Checkpointer(
        tf.train.Checkpoint(model=model),
        str(tmp_path),
        is_chief=True,
        worker_index=0,
        max_to_keep=3,
        read_only=True,
    )
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(RuntimeError, match="read-only"):
        checkpointer.save(_manifest(model, 5))


@pytest.mark.parametrize(
    "where, step, expected",
    [
        ("workdir", None, 30),
        ("checkpoints", None, 30),
        ("workdir", 20, 20),
        ("prefix", None, 20),
    ],
)
def test_find_checkpoint_resolves_a_workdir_directory_or_prefix(tmp_path, where, step, expected):
    run = _Run(tmp_path)
    for saved in (10, 20, 30):
        run.save_at(saved)
    directory = run.checkpointer.directory
    path = {
        "workdir": str(tmp_path),
        "checkpoints": directory,
        "prefix": os.path.join(directory, "ckpt-20"),
    }[where]
    prefix, manifest = checkpointing.find_checkpoint(path, step)
    assert prefix == os.path.join(directory, f"ckpt-{expected}")
    assert manifest.step == expected


def test_find_checkpoint_says_what_is_there(tmp_path):
    run = _Run(tmp_path)
    run.save_at(10)
    with pytest.raises(checkpointing.CheckpointError, match="complete steps: 10"):
        checkpointing.find_checkpoint(str(tmp_path), 7)
    with pytest.raises(checkpointing.CheckpointError, match="no complete checkpoint in"):
        checkpointing.find_checkpoint(str(tmp_path / "elsewhere"))
    os.remove(os.path.join(run.checkpointer.directory, "ckpt-10.manifest.json"))
    with pytest.raises(checkpointing.CheckpointError, match="has no manifest"):
        checkpointing.find_checkpoint(os.path.join(run.checkpointer.directory, "ckpt-10"))


def _manifest_for(**config) -> checkpointing.Manifest:
    base = {"optimizer.name": "sgd", "optimizer.momentum": 0.9}
    nested: dict = {}
    for field, value in {**base, **config}.items():  # {"a.b": 1} -> {"a": {"b": 1}}
        *parents, leaf = field.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return checkpointing.Manifest(
        step=1,
        examples_seen=8,
        model="mlp",
        model_variables=[[2]],
        optimizer="sgd",
        plan={},
        config=nested,
        versions={},
    )


@pytest.mark.parametrize(
    "field, saved, resumed, adds",
    [
        ("precision", "float32", "mixed_float16", "a dynamic loss scale"),
        ("precision", "mixed_bfloat16", "mixed_float16", "a dynamic loss scale"),
        ("precision", "mixed_float16", "float32", None),  # The loss scale is left unread.
        ("precision", "float32", "mixed_bfloat16", None),  # bfloat16 needs no loss scale.
        ("optimizer.momentum", 0.0, 0.9, "a velocity per weight"),
        ("optimizer.momentum", 0.9, 0.0, None),
        ("optimizer.momentum_correction", False, True, "a previous learning rate per weight"),
        ("optimizer.momentum_correction", True, False, None),
        ("ema_decay", 0.0, 0.9, "an EMA of the weights"),
        ("ema_decay", 0.9, 0.0, None),  # Turning it off drops the averages.
        ("ema_decay", 0.9, 0.99, None),  # Same variables, another rate.
        ("model.dropout_rate", 0.0, 0.3, "a dropout RNG state"),
        ("model.dropout_rate", 0.3, 0.0, None),
        ("health.window", 64, 128, "spike statistics of that length"),
        ("health.window", 64, 64, None),
    ],
)
def test_state_change_names_a_field_whose_new_value_needs_variables_the_checkpoint_lacks(
    field, saved, resumed, adds
):
    change = _manifest_for(**{field: saved}).state_change(_manifest_for(**{field: resumed}))
    assert change == (None if adds is None else (field, saved, resumed, adds))


@pytest.mark.parametrize("optimizer, needs", [("sgd", True), ("lars", True), ("adamw", False)])
def test_momentum_from_zero_needs_velocities_only_where_the_optimizer_keeps_them(optimizer, needs):
    """AdamW keeps its moments whatever optimizer.momentum says (it does not read the field)."""
    saved = _manifest_for(**{"optimizer.name": optimizer, "optimizer.momentum": 0.0})
    resumed = dataclasses.replace(saved, config={"optimizer": {"name": optimizer, "momentum": 0.9}})
    assert (saved.state_change(resumed) is not None) == needs


def test_a_field_missing_from_an_older_manifest_is_not_judged():
    older = _manifest_for()  # Written before precision was a field.
    assert older.state_change(_manifest_for(precision="mixed_float16")) is None

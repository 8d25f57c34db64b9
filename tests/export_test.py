"""Export: a checkpoint as a SavedModel that takes raw uint8 images, and a .keras file."""

import dataclasses
import json
import os
import random
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

from trainer import checkpointing, export, preprocessing
from trainer import setup as setup_lib
from trainer import state as state_lib
from trainer.errors import UserError


def _config(data_dir, **fields):
    small = {
        "model.name": "small_cnn",
        "model.width": 4,
        "distribution.strategy": "default",
        "dataset.data_dir": data_dir,
    }
    return testutil.config_with(**{**small, **fields})


def _save_state(workdir, config, step: int = 0):
    """A checkpoint written by the trainer's own state and Checkpointer (no training needed:
    the weights are the seeded initial ones, or shifted by `step` to tell checkpoints apart)."""
    setup = setup_lib.prepare(config)
    state = state_lib.build_state(setup)
    for variable in state.model.weights:
        variable.assign(variable + 0.01 * step)
    state.optimizer.iterations.assign(step)
    state.examples_seen.assign(step * config.global_batch_size)
    checkpointer = checkpointing.Checkpointer(
        state.checkpoint, str(workdir), is_chief=True, worker_index=0, max_to_keep=5
    )
    checkpointer.save(state_lib.manifest(setup, state))
    return setup, state


def _raw_images(setup, count: int = 16) -> np.ndarray:
    """The first eval images as stored: uint8, before any preprocessing."""
    split = setup.eval_split
    images, _ = split.decode_batch(split.reader()(tf.range(count)))
    return images.numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("run")
    setup, state = _save_state(workdir, _config(data_dir))
    _save_state(workdir, _config(data_dir), step=20)
    return workdir, setup, state


def test_export_serves_raw_uint8_images_as_the_trainers_model_sees_them(run, tmp_path):
    workdir, setup, _ = run
    directory = export.export_run(str(workdir))
    assert directory == os.path.join(workdir, "export", "final")
    assert {"saved_model.pb", "variables", "model.keras", "export.json"} <= set(
        os.listdir(directory)
    )
    info = export.read_info(directory)
    assert (info["step"], info["input_shape"], info["num_classes"]) == (20, [32, 32, 3], 10)

    images = _raw_images(setup)
    trainer_state = state_lib.build_state(setup)  # The trainer's model, restored as a resume does.
    checkpointing.Checkpointer(
        trainer_state.checkpoint, str(workdir), is_chief=False, worker_index=0, max_to_keep=1
    ).restore(20, state_lib.manifest(setup, trainer_state))
    expected = trainer_state.model(preprocessing.normalize(images), training=False).numpy()

    served = tf.saved_model.load(directory).signatures["serving_default"](images=images)
    np.testing.assert_allclose(served["logits"].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(served["classes"].numpy(), expected.argmax(-1))
    np.testing.assert_allclose(served["probabilities"].numpy().sum(-1), 1.0, rtol=1e-5)

    keras_model = keras.saving.load_model(os.path.join(directory, "model.keras"))
    np.testing.assert_allclose(
        keras_model(preprocessing.normalize(images)).numpy(), expected, rtol=1e-5, atol=1e-5
    )


def test_export_of_a_step_goes_to_its_own_directory(run):
    workdir, _, _ = run
    directory = export.export_run(str(workdir), step=0)
    assert directory.endswith(os.path.join("export", "step-0"))
    assert export.read_info(directory)["step"] == 0
    with pytest.raises(checkpointing.CheckpointError, match="complete steps: 0, 20"):
        export.export_run(str(workdir), step=7)


def test_a_manifest_with_the_input_spec_needs_no_dataset(run, tmp_path):
    workdir, _, _ = run
    prefix, manifest = checkpointing.find_checkpoint(str(workdir))
    config = json.loads(json.dumps(manifest.config))
    config["dataset"]["name"] = "not_on_this_machine"
    manifest = dataclasses.replace(manifest, config=config, input_shape=[32, 32, 3], num_classes=10)
    directory = export.export_checkpoint(prefix, manifest, str(tmp_path / "out"))
    assert export.read_info(directory)["input_shape"] == [32, 32, 3]


def test_image_size_runs_also_serve_one_image_of_any_size_through_the_eval_transform(
    tmp_path, data_dir
):
    config = _config(data_dir, **{"dataset.image_size": 24, "dataset.center_crop_fraction": 0.875})
    setup, state = _save_state(tmp_path, config)
    directory = export.export_run(str(tmp_path))
    assert set(export.read_info(directory)["signatures"]) == {"serving_default", "serve_image"}

    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    served = tf.saved_model.load(directory).signatures["serve_image"](image=image)
    example = setup.preprocessing.eval_example(tf.constant(image))
    expected = state.model(example[tf.newaxis], training=False).numpy()
    np.testing.assert_allclose(served["logits"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_failed_export_leaves_the_previous_one_and_the_next_one_cleans_up(
    run, tmp_path, monkeypatch
):
    workdir, _, _ = run
    prefix, manifest = checkpointing.find_checkpoint(str(workdir))
    target = str(tmp_path / "final")
    export.export_checkpoint(prefix, manifest, target)
    written = os.path.getmtime(os.path.join(target, "export.json"))

    def full_disk(staging: str) -> None:
        raise OSError("No space left on device")

    with pytest.raises(UserError, match="No space left on device.*previous export there is intact"):
        export.export_checkpoint(prefix, manifest, target, add_files=full_disk)
    assert os.path.getmtime(os.path.join(target, "export.json")) == written
    export.export_checkpoint(prefix, manifest, target)
    assert sorted(os.listdir(tmp_path)) == ["final"]  # No staging or .old debris left.


def test_exporting_inside_a_run_leaves_the_global_rng_alone(run, tmp_path):
    workdir, _, _ = run
    prefix, manifest = checkpointing.find_checkpoint(str(workdir))
    random.seed(7)
    before = random.random()
    random.seed(7)
    export.export_checkpoint(prefix, manifest, str(tmp_path / "x"))
    assert random.random() == before


_FRESH_PROCESS = """
import sys
import keras, numpy as np, tensorflow as tf
directory, images = sys.argv[1], np.load(sys.argv[2])
logits = tf.saved_model.load(directory).signatures["serving_default"](images=images)["logits"]
np.save(sys.argv[3], logits.numpy())
keras.saving.load_model(directory + "/model.keras")
"""


@pytest.mark.slow  # Two fresh processes (the export tool, then a plain TF reader): ~30 s.
def test_export_tool_output_serves_the_same_logits_in_a_fresh_process(run, tmp_path):
    workdir, setup, state = run
    tool = subprocess.run(
        [sys.executable, "-m", "trainer.export", f"--workdir={workdir}", "--step=0"],
        cwd=testutil.REPO,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    directory = os.path.join(workdir, "export", "step-0")
    assert f"export | step: 0 | wrote {directory}" in tool.stderr
    assert "oneDNN" not in tool.stderr and "cuda" not in tool.stderr.lower()

    images = _raw_images(setup)
    np.save(tmp_path / "images.npy", images)
    subprocess.run(
        [
            sys.executable,
            "-c",
            _FRESH_PROCESS,
            directory,
            tmp_path / "images.npy",
            tmp_path / "out",
        ],
        env=testutil.ENV,
        timeout=300,
        check=True,
    )
    expected = state.model(preprocessing.normalize(images), training=False).numpy()  # Step 0.
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)

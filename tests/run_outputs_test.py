"""What a run gives back, end to end: export/final at the end, export/best during the run, and
fine-tuning from another run (weights once, at the fresh start; never again on resume).

In-process runs (`train_and_evaluate`, default strategy, a tiny MLP).
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import testutil
from absl import logging as absl_logging

from trainer import checkpointing, export, metrics, train
from trainer.extras import init_checkpoint

pytestmark = pytest.mark.slow


def _config(data_dir, **fields):
    small = {"total_steps": 30, "checkpoint_every_steps": 30}
    return testutil.tiny_run_config(data_dir, **{**small, **fields})


def test_a_run_exports_at_the_end_and_keeps_its_best_eval(tmp_path, data_dir):
    config = _config(data_dir, best_metric="eval_loss", best_mode="min")
    train.train_and_evaluate(config, str(tmp_path))
    evals = [r for r in metrics.read_records(str(tmp_path)) if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])

    with open(tmp_path / "export" / "best" / "best.json") as f:
        kept = json.load(f)
    assert (kept["step"], kept["value"]) == (best["step"], best["eval_loss"])
    copy = tmp_path / "export" / "best" / "checkpoint" / f"ckpt-{best['step']}.index"
    assert copy.exists()
    assert export.read_info(str(tmp_path / "export" / "final"))["step"] == 30
    # Every eval's step was checkpointed (for the best), beyond checkpoint_every_steps.
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-30")


def test_keeping_the_best_does_not_change_the_run(tmp_path, data_dir, monkeypatch):
    """Exports inside the trainer leave its state and RNG alone: a run that keeps its best, and
    crashes and resumes on the way, ends bit for bit where a plain run does."""
    train.train_and_evaluate(_config(data_dir), str(tmp_path / "plain"))
    with_best = _config(data_dir, best_metric="eval_accuracy", best_mode="max")
    testutil.crash_at(monkeypatch, 25)  # Like kill -9: after the best of steps 10 and 20 was kept.
    with pytest.raises(testutil.Crash):
        train.train_and_evaluate(with_best, str(tmp_path / "best"))
    monkeypatch.undo()
    train.train_and_evaluate(with_best, str(tmp_path / "best"))  # Resumes at ckpt-20.
    testutil.assert_bitwise_equal(tmp_path / "plain", tmp_path / "best", 30, has_dropout=False)


@pytest.fixture
def absl_info():
    """INFO through absl's verbosity, as under cli.run: TF's SavedModel writer saves and restores
    the verbosity, which would undo a level set on the absl logger alone."""
    absl_logging.set_verbosity(absl_logging.INFO)
    yield
    absl_logging.set_verbosity(absl_logging.WARNING)  # The default outside a command line.


def test_fine_tuning_loads_once_and_a_resume_never_reads_the_source_again(
    tmp_path, data_dir, caplog, absl_info
):
    source = tmp_path / "pretrained"
    train.train_and_evaluate(_config(data_dir, total_steps=10), str(source))
    source_prefix, source_manifest = checkpointing.find_checkpoint(str(source))
    source_model = export.load_model(source_prefix, source_manifest)

    target = tmp_path / "finetuned"
    config = _config(
        data_dir,
        total_steps=10,
        seed=3,
        init_checkpoint=str(source),
        init_checkpoint_exclude=("dense_2",),  # The MLP's classifier: a new head.
    )
    train.train_and_evaluate(config, str(target))
    assert "init_checkpoint | from: " in caplog.text
    assert "newly initialized: 1 (dense_2)" in caplog.text

    start = export.load_model(*checkpointing.find_checkpoint(str(target), 0))
    before, after = init_checkpoint.layer_names(source_model), init_checkpoint.layer_names(start)
    for name in ("dense", "dense_1"):  # The body came from the source...
        for a, b in zip(before[name].get_weights(), after[name].get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    head_before, head_after = before["dense_2"].get_weights(), after["dense_2"].get_weights()
    assert not np.array_equal(head_before[0], head_after[0])  # ...the head did not.
    assert checkpointing.read_manifest(str(target / "checkpoints" / "ckpt-0")).step == 0

    shutil.rmtree(source)  # A resume that read it again would now fail.
    caplog.clear()
    config.total_steps = 20
    train.train_and_evaluate(config, str(target))
    assert "init_checkpoint |" not in caplog.text
    assert checkpointing.find_checkpoint(str(target))[1].step == 20
    assert os.path.exists(target / "export" / "final" / "saved_model.pb")

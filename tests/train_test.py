"""End to end: `python -m trainer.main` in fresh processes, as a user runs it."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import testutil

from trainer import metrics

pytestmark = pytest.mark.slow

TOTAL_STEPS = 60
WARMUP_STEPS = 20
# lr.base 0.05 at 256, linear rule, global batch 128. A gentle LR: at the default 0.2 this MLP's
# first steps are chaotic enough that float reduction order alone changes the 10-step mean loss.
PEAK_LR = 0.05 * 128 / 256
SMALL_RUN = (
    f"--config.total_steps={TOTAL_STEPS}",
    f"--config.lr.warmup_steps={WARMUP_STEPS}",
    "--config.lr.base=0.05",
    "--config.steps_per_loop=10",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=30",
    "--config.checkpoint_every_steps=30",
    "--config.model.name=mlp",
    "--config.model.width=8",
)
STRATEGIES = {
    "default": ("--config.distribution.strategy=default",),
    "mirrored2": (
        "--config.distribution.strategy=mirrored",
        "--config.distribution.cpu_replicas=2",
    ),
    "mirrored4": (
        "--config.distribution.strategy=mirrored",
        "--config.distribution.cpu_replicas=4",
    ),
}


def expected_lr(update: int) -> float:
    """The default config's curve, written out by hand: linear warmup, then cosine to 0."""
    if update <= WARMUP_STEPS:
        return PEAK_LR * update / WARMUP_STEPS
    progress = (update - WARMUP_STEPS) / (TOTAL_STEPS - WARMUP_STEPS)
    return PEAK_LR * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """One small run per strategy; the tests below read what they left behind."""
    workdirs = {}
    for name, flags in STRATEGIES.items():
        workdir = tmp_path_factory.mktemp(name)
        result = testutil.run_main(workdir, *SMALL_RUN, *flags, data_dir=data_dir)
        workdirs[name] = (workdir, result)
    return workdirs


def train_records(workdir) -> list[dict]:
    return [r for r in metrics.read_records(workdir) if "loss" in r]


def eval_records(workdir) -> list[dict]:
    return [r for r in metrics.read_records(workdir) if "eval_accuracy" in r]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_run_leaves_its_files(runs, name):
    workdir, result = runs[name]
    assert {"checkpoints", "metrics.jsonl", "tensorboard", "config.json"} <= set(
        os.listdir(workdir)
    )
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    checkpoint_files = os.listdir(workdir / "checkpoints")
    assert f"ckpt-{TOTAL_STEPS}.index" in checkpoint_files
    assert f"ckpt-{TOTAL_STEPS}.manifest.json" in checkpoint_files
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == TOTAL_STEPS
    replicas = {"default": 1, "mirrored2": 2, "mirrored4": 4}[name]
    assert f"replicas: {replicas} " in result.stderr
    assert f"per-replica batch: {128 // replicas} " in result.stderr
    assert f"peak lr: {PEAK_LR:g} " in result.stderr
    assert "steps/sec:" in result.stderr and "eta:" in result.stderr


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_logged_lr_is_the_scaled_warmed_up_schedule_and_loss_falls(runs, name):
    workdir, _ = runs[name]
    records = train_records(workdir)
    assert [r["step"] for r in records] == list(range(10, TOTAL_STEPS + 1, 10))
    for record in records:
        assert record["learning_rate"] == pytest.approx(expected_lr(record["step"]), abs=1e-7)
        assert record["examples_per_sec"] > 0
    assert records[-1]["loss"] < records[0]["loss"] - 0.1
    evals = eval_records(workdir)
    assert [r["step"] for r in evals] == [30, 60]
    # 10 balanced classes: chance is 0.1 (std 0.007 on 2,000 examples); measured 0.149.
    assert evals[-1]["eval_accuracy"] > 0.13


def test_same_global_batch_agrees_across_1_2_4_replicas(runs):
    reference = train_records(runs["default"][0])
    for name in ("mirrored2", "mirrored4"):
        records = train_records(runs[name][0])
        assert [r["learning_rate"] for r in records] == [r["learning_rate"] for r in reference]
        np.testing.assert_allclose(
            [r["loss"] for r in records], [r["loss"] for r in reference], rtol=2e-3
        )


def test_rerun_resumes_at_the_saved_step(runs, data_dir, tmp_path):
    workdir = tmp_path / "copy"  # A copy: the other tests read the shared run as it was left.
    shutil.copytree(runs["mirrored2"][0], workdir)
    longer = [f for f in SMALL_RUN if "total_steps" not in f] + ["--config.total_steps=80"]
    result = testutil.run_main(workdir, *longer, *STRATEGIES["mirrored2"], data_dir=data_dir)
    assert f"resumed at step {TOTAL_STEPS}" in result.stderr
    steps = [r["step"] for r in train_records(workdir)]
    assert steps == list(range(10, 81, 10))  # Continues; no second step 10.


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--config.global_batch_size=250", "--config.distribution.cpu_replicas=4"),
            "global_batch_size (250) is not divisible by the 4 replicas; use a multiple of 4",
        ),
        (("--config.lr.scaling=cubic",), "lr.scaling ('cubic') is not one of linear, sqrt, none"),
        (("--config.lr.warmup_steps=700",), "lr.warmup_steps (700) must be smaller than"),
        (("--config.dataset.name=mnist",), "trainer.datasets.build --dataset=mnist"),
        (("--config.distribution.strategy=tpu",), "no TPU is reachable"),
        (
            ("--config.dataset.name=tfscale_shapes_variable",),
            "variable size (None, None, 3); set --config.dataset.image_size",
        ),
        (
            ("--config.dataset.augment=inception_crop",),
            "dataset.augment='inception_crop' resizes its crops to dataset.image_size",
        ),
    ],
)
def test_bad_input_is_one_actionable_line(tmp_path, flags, message):
    result = testutil.run_main(tmp_path / "run", *flags, data_dir=str(tmp_path), check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # Nothing was written.


def test_a_misspelled_config_field_fails(tmp_path, data_dir):
    result = testutil.run_main(tmp_path, "--config.lr.bsae=0.1", data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no such config field 'bsae'")
    assert "Traceback" not in result.stderr

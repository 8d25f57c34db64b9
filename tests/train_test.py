"""End to end: `python -m trainer.main` as a user runs it.

Fresh processes (marked slow) for what only a process shows: one run per strategy, each with TF's
own cross-device ops, resuming by rerunning, and how a bad input ends (stderr, exit code). The
same entry point in-process (fast) for a short run and for each kind of bad input.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest
import testutil
from absl import flags as absl_flags

from trainer import main as main_lib
from trainer import metrics
from trainer.errors import UserError

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_same_global_batch_agrees_across_1_2_4_replicas(runs):
    reference = train_records(runs["default"][0])
    for name in ("mirrored2", "mirrored4"):
        records = train_records(runs[name][0])
        assert [r["learning_rate"] for r in records] == [r["learning_rate"] for r in reference]
        np.testing.assert_allclose(
            [r["loss"] for r in records], [r["loss"] for r in reference], rtol=2e-3
        )


@pytest.mark.slow
def test_rerun_resumes_at_the_saved_step(runs, data_dir, tmp_path):
    workdir = tmp_path / "copy"  # A copy: the other tests read the shared run as it was left.
    shutil.copytree(runs["mirrored2"][0], workdir)
    longer = [f for f in SMALL_RUN if "total_steps" not in f] + ["--config.total_steps=80"]
    result = testutil.run_main(workdir, *longer, *STRATEGIES["mirrored2"], data_dir=data_dir)
    assert f"resumed at step {TOTAL_STEPS}" in result.stderr
    steps = [r["step"] for r in train_records(workdir)]
    assert steps == list(range(10, 81, 10))  # Continues; no second step 10.


# For runs in the test process: op determinism is process-wide and cannot be turned off again, and
# with it on, unseeded random ops in later tests fail. The slow runs use the default (on, on CPU).
NOT_DETERMINISTIC = "--config.deterministic=False"


def _run_main_in_process(*argv: str) -> None:
    """`python -m trainer.main ARGV` in this process: the same flag parsing and `main`.

    ml_collections defines a flag per `--config.FIELD` override it parses, and defining one twice
    in a process is an error, so those are dropped before and after (other tests parse too).
    """

    def drop_config_overrides() -> None:
        for name in [name for name in absl_flags.FLAGS if name.startswith("config.")]:
            delattr(absl_flags.FLAGS, name)

    drop_config_overrides()
    try:
        testutil.run_cli_in_process(main_lib.main, *argv)
    finally:
        drop_config_overrides()


def test_main_in_process_trains_logs_evaluates_and_checkpoints(tmp_path, data_dir):
    """The entry point, in-process, for 6 steps: what the slow runs check, at a smaller scale."""
    total, warmup, peak = 6, 2, 0.05 * 128 / 256
    _run_main_in_process(
        *testutil.main_flags(
            tmp_path,
            f"--config.total_steps={total}",
            f"--config.lr.warmup_steps={warmup}",
            "--config.lr.base=0.05",
            "--config.steps_per_loop=3",
            "--config.log_every_steps=3",
            "--config.eval_every_steps=6",
            "--config.checkpoint_every_steps=6",
            "--config.model.name=mlp",
            "--config.model.width=8",
            "--config.distribution.strategy=default",
            NOT_DETERMINISTIC,
            data_dir=data_dir,
        )
    )
    assert {"checkpoints", "metrics.jsonl", "tensorboard", "config.json"} <= set(
        os.listdir(tmp_path)
    )
    checkpoint_files = os.listdir(tmp_path / "checkpoints")
    assert f"ckpt-{total}.index" in checkpoint_files
    assert f"ckpt-{total}.manifest.json" in checkpoint_files
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == total
    records = train_records(tmp_path)
    assert [r["step"] for r in records] == [3, 6]
    # Update 3 is past the 2-step warmup: cosine from update 2 to 6, by hand.
    expected = {3: peak * 0.5 * (1 + math.cos(math.pi * 1 / 4)), 6: 0.0}
    for record in records:
        assert record["learning_rate"] == pytest.approx(expected[record["step"]], abs=1e-7)
        assert record["examples_seen"] == record["step"] * 128
        assert np.isfinite(record["loss"])
    assert [r["step"] for r in eval_records(tmp_path)] == [total]


# (flags, fragment of the one-line message). Each is checked in-process below, through
# `trainer.main`'s flag parsing and `main`; the first also in a fresh process, for how the CLI ends.
BAD_INPUTS = [
    (
        ("--config.global_batch_size=250", "--config.distribution.cpu_replicas=4"),
        "global_batch_size (250) is not divisible by the 4 replicas; use a multiple of 4",
    ),
    (("--config.lr.scaling=cubic",), "lr.scaling ('cubic') is not one of linear, sqrt, none"),
    (("--config.lr.warmup_steps=700",), "lr.warmup_steps (700) must be smaller than"),
    (("--config.dataset.name=mnist",), "trainer.datasets.build --dataset=mnist"),
    # strategy=tpu: in distribute_test.py. Set-up tries it first, before anything is written;
    # here, late in a long test process, the TPU probe took 20-40 s.
    (
        ("--config.dataset.name=tfscale_shapes_variable",),
        "variable size (None, None, 3); set --config.dataset.image_size",
    ),
    (
        ("--config.dataset.augment=inception_crop",),
        "dataset.augment='inception_crop' resizes its crops to dataset.image_size",
    ),
]


@pytest.mark.slow
def test_bad_input_ends_the_command_with_one_actionable_line(tmp_path, data_dir):
    """How every user error ends the command line: one `error:` line, no traceback, exit 1,
    nothing written. The other bad inputs take the same path (a UserError out of set-up)."""
    flags, message = BAD_INPUTS[0]
    result = testutil.run_main(tmp_path / "run", *flags, data_dir=data_dir, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # Nothing was written.


@pytest.mark.slow
@pytest.mark.xla_cpu
def test_jit_compile_that_xla_refuses_is_one_actionable_line(tmp_path, data_dir):
    """The default CNN under op determinism (the default on CPU): XLA has no deterministic
    MaxPool gradient. TF says so only when the loop first runs (after ckpt-0); the command ends
    with one line naming both ways out, and the first of them works."""
    run = (
        "--config.jit_compile=True",
        "--config.total_steps=2",
        "--config.steps_per_loop=2",
        "--config.lr.warmup_steps=1",
    )
    result = testutil.run_main(tmp_path / "run", *run, data_dir=data_dir, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        "error: jit_compile (True): XLA cannot compile the model's forward/backward pass with "
        "op determinism on"
    )
    assert "MaxPool" in last_line
    assert (
        "set --config.deterministic=False" in last_line
        and "--config.jit_compile=False" in last_line
    )
    assert "Traceback" not in result.stderr
    testutil.run_main(tmp_path / "run", *run, NOT_DETERMINISTIC, data_dir=data_dir)
    assert testutil.logged(tmp_path / "run", "loss")[-1][0] == 2


@pytest.mark.parametrize(("flags", "message"), BAD_INPUTS)
def test_bad_input_is_one_actionable_line(tmp_path, data_dir, flags, message):
    # mnist is not prepared in an empty data_dir; the others read the session's shapes datasets.
    data = str(tmp_path) if "--config.dataset.name=mnist" in flags else data_dir
    # Op determinism is process-wide (see above); every case fails before it would matter.
    argv = testutil.main_flags(tmp_path / "run", *flags, NOT_DETERMINISTIC, data_dir=data)
    with pytest.raises(UserError) as error:  # The CLI prints a UserError as `error: MESSAGE`.
        _run_main_in_process(*argv)
    assert message in str(error.value)
    assert "\n" not in str(error.value)  # One line.
    assert not (tmp_path / "run").exists()  # Nothing was written.


def test_a_misspelled_config_field_fails(tmp_path, data_dir):
    with pytest.raises(SystemExit) as exit_info:
        _run_main_in_process(
            *testutil.main_flags(tmp_path, "--config.lr.bsae=0.1", data_dir=data_dir)
        )
    message = exit_info.value.code
    assert isinstance(message, str)  # sys.exit(str): printed to stderr, exit code 1.
    assert message.startswith("error: no such config field 'bsae'") and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # Nothing was written.

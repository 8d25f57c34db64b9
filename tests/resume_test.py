"""Exact resume: interrupted runs end bitwise equal to straight ones; bad states fail loudly."""

import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import testutil
from testutil import assert_bitwise_equal, checkpoint_values, logged, wait_for_step

from trainer import metrics, preemption

pytestmark = pytest.mark.slow

TOTAL = 60
# Dropout (RNG state), a milestone after the interruption and plateau decisions at every eval.
RUN = (
    f"--config.total_steps={TOTAL}",
    "--config.lr.warmup_steps=10",
    "--config.steps_per_loop=5",
    "--config.log_every_steps=5",
    "--config.eval_every_steps=10",
    "--config.checkpoint_every_steps=20",
    "--config.model.name=mlp",
    "--config.model.width=8",
    "--config.model.dropout_rate=0.3",
    "--config.lr.milestones=(45,)",
    "--config.lr.milestones_unit=steps",
    "--config.lr.milestone_values=(0.5,)",
    "--config.lr.plateau_metric=eval_loss",
    "--config.lr.plateau_patience=1",
    "--config.lr.plateau_min_delta=10.0",
    "--config.distribution.strategy=mirrored",
    "--config.distribution.cpu_replicas=2",
)


def start(workdir, data_dir, *extra: str, hold_at_step: int | None = None) -> subprocess.Popen:
    return testutil.start_main(workdir, *RUN, *extra, data_dir=data_dir, hold_at_step=hold_at_step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("straight")
    testutil.run_main(workdir, *RUN, data_dir=data_dir)
    return workdir


def test_sigterm_twice_then_resume_is_bitwise_identical(straight, tmp_path, data_dir):
    rng = random.Random(0)
    # Several interruptions, the second before the milestone (the run stops by step 40).
    for after_step in (10, 35):
        process = start(tmp_path, data_dir, hold_at_step=after_step + 5)
        wait_for_step(tmp_path, after_step, process)
        time.sleep(rng.uniform(0, 0.5))  # An arbitrary moment inside the next inner loop.
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == preemption.EXIT_CODE_PREEMPTED, stderr[-3000:]
        assert "rerun the same command to resume" in stderr
    testutil.run_main(tmp_path, *RUN, data_dir=data_dir)

    assert_bitwise_equal(straight, tmp_path, TOTAL)
    steps = [s for s, _ in logged(tmp_path, "loss")]
    assert steps == list(range(5, TOTAL + 1, 5))  # Each step logged once.
    assert logged(tmp_path, "learning_rate") == logged(straight, "learning_rate")
    assert logged(tmp_path, "lr_event") == logged(straight, "lr_event")
    assert any("milestone" in e for _, e in logged(straight, "lr_event"))
    assert any("plateau" in e for _, e in logged(straight, "lr_event"))


def test_sigterm_with_accumulation_stops_at_an_update_boundary_and_resumes_bitwise(
    tmp_path, data_dir
):
    """4 micro-batches per update (2 replicas x 16 x 4 = 128): the signal lands inside an inner
    loop, mostly inside an update's accumulation; the stop waits for the loop's end, and the
    resumed run ends bitwise equal to a straight one, counting examples per update."""
    accumulate = "--config.accumulation_steps=4"
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    testutil.run_main(straight, *RUN, accumulate, data_dir=data_dir)
    process = start(interrupted, data_dir, accumulate, hold_at_step=30)
    wait_for_step(interrupted, 20, process)
    time.sleep(random.Random(2).uniform(0, 0.5))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == preemption.EXIT_CODE_PREEMPTED, stderr[-3000:]
    testutil.run_main(interrupted, *RUN, accumulate, data_dir=data_dir)

    assert_bitwise_equal(straight, interrupted, TOTAL)
    assert logged(interrupted, "learning_rate") == logged(straight, "learning_rate")
    seen = logged(interrupted, "examples_seen")
    assert seen == [(step, step * 128) for step in range(5, TOTAL + 1, 5)]


def test_sigkill_at_an_arbitrary_moment_resumes_from_the_last_complete_save(
    straight, tmp_path, data_dir
):
    process = start(tmp_path, data_dir, hold_at_step=40)  # The kill ends the hold, if held.
    wait_for_step(tmp_path, 20, process)  # Around the step-20 checkpoint write.
    time.sleep(random.Random(1).uniform(0, 0.3))
    process.kill()
    process.communicate(timeout=60)
    manifests = (tmp_path / "checkpoints").glob("ckpt-*.manifest.json")
    last_complete = max(int(path.name.split(".")[0].split("-")[1]) for path in manifests)
    result = testutil.run_main(tmp_path, *RUN, data_dir=data_dir)
    assert f"resumed at step {last_complete} " in result.stderr
    assert_bitwise_equal(straight, tmp_path, TOTAL)
    assert [s for s, _ in logged(tmp_path, "loss")] == list(range(5, TOTAL + 1, 5))


def test_nan_with_fail_policy_stops_and_keeps_good_checkpoints(tmp_path, data_dir):
    result = testutil.run_with_nan_at(33, tmp_path, *RUN, data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert "loss is nan" in result.stderr and "step 35" in result.stderr
    assert "last good checkpoint" in result.stderr and "ckpt-20" in result.stderr
    saved = sorted(f for f in os.listdir(tmp_path / "checkpoints") if f.endswith(".manifest.json"))
    assert saved == ["ckpt-0.manifest.json", "ckpt-20.manifest.json"]


def test_nan_with_recover_policy_restores_and_lowers_the_lr(straight, tmp_path, data_dir):
    testutil.run_with_nan_at(
        33,
        tmp_path,
        *RUN,
        "--config.nan_policy=recover",
        "--config.nan_lr_factor=0.25",
        data_dir=data_dir,
    )
    events = [e for _, e in logged(tmp_path, "lr_event") if "NaN recovery" in e]
    assert len(events) == 1
    final = checkpoint_values(tmp_path, TOTAL)
    assert all(np.isfinite(v).all() for v in final.values() if v.dtype.kind == "f")
    steps = [s for s, _ in logged(tmp_path, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL
    # Restored from ckpt-20 with the LR x 0.25 from there on; the milestone and plateau
    # decisions replay as in the straight run (their state came back with the checkpoint).
    straight_lr = dict(logged(straight, "learning_rate"))
    recovered_lr = dict(logged(tmp_path, "learning_rate"))
    assert sorted(recovered_lr) == sorted(straight_lr)
    for step, value in recovered_lr.items():
        factor = 0.25 if step > 20 else 1.0
        assert value == pytest.approx(factor * straight_lr[step], rel=1e-5), step


def test_nan_recovery_after_a_batch_change_keeps_the_schedule_position(tmp_path, data_dir):
    """A NaN recovery restores a checkpoint written under the old global batch; the schedule
    must continue from the examples seen, not rewind to that checkpoint's plan position."""
    plain = [f for f in RUN if "lr.milestone" not in f and "plateau" not in f]
    testutil.run_main(tmp_path, *plain, f"--config.total_examples={30 * 128}", data_dir=data_dir)
    testutil.run_with_nan_at(
        35,
        tmp_path,
        *plain,
        "--config.global_batch_size=64",
        f"--config.total_examples={60 * 128}",
        "--config.nan_policy=recover",
        "--config.nan_lr_factor=0.5",
        data_dir=data_dir,
    )
    assert len([e for _, e in logged(tmp_path, "lr_event") if "NaN recovery" in e]) == 1
    records = [r for r in metrics.read_records(tmp_path) if "loss" in r]
    # 30 updates at 128, then 60 at 64: 60 * 128 examples in all, none repeated or skipped.
    assert [r["step"] for r in records[6:]] == list(range(35, 91, 5))
    assert records[-1]["examples_seen"] == 60 * 128
    # After the recovery the LR is 0.5 x the new plan's cosine at plan step = step + 30.
    peak, total = 0.2 * 64 / 256, 120
    for record in records[6:]:
        plan_update = record["step"] + 30
        cosine = peak * 0.5 * (1 + np.cos(np.pi * (plan_update - 10) / (total - 10)))
        assert record["learning_rate"] == pytest.approx(0.5 * cosine, rel=1e-5), record


def test_checkpoint_of_another_model_is_refused(tmp_path, data_dir):
    testutil.run_main(tmp_path, *RUN, "--config.total_steps=15", data_dir=data_dir)
    result = testutil.run_main(
        tmp_path, *RUN, "--config.model.width=4", data_dir=data_dir, check=False
    )
    assert result.returncode == 1
    assert "was written for model" in result.stderr and "new --workdir" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_trainer_on_the_same_workdir_is_refused(tmp_path, data_dir):
    first = start(tmp_path, data_dir, "--config.total_steps=100000")  # Still running later.
    try:
        wait_for_step(tmp_path, 5, first)
        second = testutil.run_main(tmp_path, *RUN, data_dir=data_dir, check=False)
        assert second.returncode == 1
        assert "another trainer holds" in second.stderr and "trainer.lock" in second.stderr
    finally:
        first.kill()
        first.communicate()


def test_unwritable_workdir_is_a_clear_error(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = testutil.run_main(blocker / "workdir", *RUN, data_dir=data_dir, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: workdir ") and "cannot be created" in last_line
    assert "use a --workdir you can write to" in last_line and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("old_replicas", "new_replicas", "new_batch"), [(4, 2, 128), (4, 2, 64), (2, 4, 128)]
)
def test_resume_on_another_replica_count_continues_from_the_examples_seen(
    tmp_path, data_dir, old_replicas, new_replicas, new_batch
):
    plain = [f for f in RUN if "lr.milestone" not in f and "plateau" not in f]
    testutil.run_main(
        tmp_path,
        *plain,
        f"--config.distribution.cpu_replicas={old_replicas}",
        f"--config.total_examples={30 * 128}",
        data_dir=data_dir,
    )
    result = testutil.run_main(
        tmp_path,
        *plain,
        f"--config.distribution.cpu_replicas={new_replicas}",
        f"--config.global_batch_size={new_batch}",
        f"--config.total_examples={60 * 128}",
        data_dir=data_dir,
    )
    assert f"replicas changed {old_replicas} -> {new_replicas}" in result.stderr
    records = [r for r in metrics.read_records(tmp_path) if "loss" in r]
    seen = [r["examples_seen"] for r in records]
    # No example repeated or skipped: the stream continues from the examples already seen.
    assert seen[5] == 30 * 128 and seen[6] == 30 * 128 + 5 * new_batch
    assert seen[-1] == 60 * 128
    # The schedule continues at the same number of examples, with the peak rescaled (linear):
    # 5 steps after resuming, the run is at plan step 30 * 128 / new_batch + 5 of
    # 60 * 128 / new_batch, past a 10-step warmup, on a cosine to 0.
    peak = 0.2 * new_batch / 256
    plan_step, total = 30 * 128 // new_batch + 5, 60 * 128 // new_batch
    expected = peak * 0.5 * (1 + np.cos(np.pi * (plan_step - 10) / (total - 10)))
    assert records[6]["learning_rate"] == pytest.approx(expected, rel=1e-5)
    if new_batch != 128:
        assert f"global batch changed 128 -> {new_batch}" in result.stderr

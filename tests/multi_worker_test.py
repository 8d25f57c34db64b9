"""MultiWorkerMirroredStrategy: two worker processes on loopback, started as users start them."""

import os
import signal
import subprocess

import numpy as np
import pytest
import testutil
from testutil import assert_bitwise_equal, logged, wait_for_step

pytestmark = pytest.mark.slow

RUN = (
    "--config.total_steps=30",
    "--config.lr.warmup_steps=5",
    "--config.lr.base=0.05",
    "--config.model.name=mlp",
    "--config.model.width=8",
    "--config.steps_per_loop=5",
    "--config.log_every_steps=5",
    "--config.eval_every_steps=15",
    "--config.checkpoint_every_steps=15",
)


def launch(workdir, data_dir) -> subprocess.Popen:
    command = [
        "launch/multi_worker_local.sh",
        "2",
        *testutil.main_flags(workdir, *RUN, data_dir=data_dir),
    ]
    return subprocess.Popen(
        command,
        cwd=testutil.REPO,
        env=testutil.ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def workers_of(workdir) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", f"trainer.main.*--workdir={workdir} "], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("multi_worker")
    process = launch(workdir, data_dir)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return workdir, stderr


def test_two_workers_train_as_one_job(straight, tmp_path, data_dir):
    workdir, stderr = straight
    assert stderr.count("replicas: 2 (workers: 2)") == 2  # Both workers planned the same job.
    assert sorted(os.listdir(workdir)) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "tensorboard",
    ]
    # Same global batch on one process with 2 replicas: same applied LRs, losses close.
    testutil.run_main(
        tmp_path,
        *RUN,
        "--config.distribution.strategy=mirrored",
        "--config.distribution.cpu_replicas=2",
        data_dir=data_dir,
    )
    assert logged(workdir, "learning_rate") == logged(tmp_path, "learning_rate")
    np.testing.assert_allclose(
        [v for _, v in logged(workdir, "loss")], [v for _, v in logged(tmp_path, "loss")], rtol=1e-3
    )


def test_sigterm_to_one_worker_checkpoints_both_and_the_launcher_resumes(
    straight, tmp_path, data_dir
):
    process = launch(tmp_path, data_dir)
    wait_for_step(tmp_path, 5, process)
    (worker, *_) = workers_of(tmp_path)
    os.kill(worker, signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert "exit 42 (preempted); resuming" in stderr
    assert stderr.count("resumed at step") == 2  # Both workers restored the same checkpoint.
    assert_bitwise_equal(straight[0], tmp_path, step=30, has_dropout=False)
    assert [s for s, _ in logged(tmp_path, "loss")] == list(range(5, 31, 5))

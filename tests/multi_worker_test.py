"""MultiWorkerMirroredStrategy: two worker processes on loopback, started as users start them."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

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


def launch(workdir, data_dir, *overrides: str, env=testutil.ENV) -> subprocess.Popen:
    command = [
        "launch/multi_worker_local.sh",
        "2",
        *testutil.main_flags(workdir, *RUN, *overrides, data_dir=data_dir),
    ]
    return subprocess.Popen(
        command,
        cwd=testutil.REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def workers_of(workdir, module: str = "trainer.main") -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", f"{module}.*--workdir={workdir} "], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


def chief_held_at(step: int, directory) -> dict:
    """The environment of a launch whose first chief (TF_CONFIG index 0) runs through
    tests/hold_for_signal.py, so it stops by `step` at the latest: a `python` first on PATH swaps
    its `-m trainer.main` once, and passes every other call (the relaunch, the other worker, the
    launcher's own scripts) to the real interpreter."""
    marker = directory / "chief_held"
    shim = directory / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ "$1 $2" == "-m trainer.main" && "$TF_CONFIG" == *\'"index": 0}}\'* '
        f"&& ! -e {marker} ]]; then\n"
        f"  touch {marker}\n"
        f'  shift 2; exec {sys.executable} -m hold_for_signal --hold_at_step={step} "$@"\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    shim.chmod(0o755)
    env = testutil.INJECTION_ENV
    return {**env, "PATH": f"{shim.parent}{os.pathsep}{env['PATH']}"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("multi_worker")
    process = launch(workdir, data_dir)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return workdir, stderr


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory, data_dir):
    """The same run on one process with 2 replicas (the same global batch)."""
    workdir = tmp_path_factory.mktemp("mirrored")
    testutil.run_main(
        workdir,
        *RUN,
        "--config.distribution.strategy=mirrored",
        "--config.distribution.cpu_replicas=2",
        data_dir=data_dir,
    )
    return workdir


def assert_matches_mirrored(workdir, mirrored_workdir) -> None:
    """Same applied LRs, losses close: reduction order differs, so not bitwise."""
    assert logged(workdir, "learning_rate") == logged(mirrored_workdir, "learning_rate")
    np.testing.assert_allclose(
        [v for _, v in logged(workdir, "loss")],
        [v for _, v in logged(mirrored_workdir, "loss")],
        rtol=1e-3,
    )


def test_two_workers_train_as_one_job(straight, mirrored):
    workdir, stderr = straight
    assert stderr.count("replicas: 2 (workers: 2)") == 2  # Both workers planned the same job.
    assert stderr.count("| all-reduce: collectives, auto (TF picks) |") == 2
    assert sorted(os.listdir(workdir)) == [
        "checkpoints",
        "config.json",
        "export",
        "health.json",
        "health.png",
        "health_steps.jsonl",
        "metrics.jsonl",
        "tensorboard",
    ]
    assert_matches_mirrored(workdir, mirrored)


def test_multi_worker_sh_on_two_hosts_is_the_same_job(straight, mirrored, tmp_path, data_dir):
    """launch/multi_worker.sh as it runs on two hosts (here both on loopback): the same training
    as multi_worker_local.sh (bitwise: same topology) and as Mirrored(2) in one process."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in testutil.free_ports(2))
    flags = testutil.main_flags(tmp_path, *RUN, data_dir=data_dir)
    workers = [
        subprocess.Popen(
            ["launch/multi_worker.sh", f"--hosts={hosts}", f"--index={index}", *flags],
            cwd=testutil.REPO,
            env=testutil.ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for index in (0, 1)
    ]
    try:
        for worker in workers:
            _, stderr = worker.communicate(timeout=300)
            assert worker.returncode == 0, stderr[-3000:]
            assert "replicas: 2 (workers: 2)" in stderr
    finally:  # A failed worker leaves the other waiting for it.
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    assert_bitwise_equal(straight[0], tmp_path, step=30, has_dropout=False)
    assert_matches_mirrored(tmp_path, mirrored)


def test_slurm_sbatch_trains_through_the_slurm_cluster_resolver(tmp_path, data_dir):
    """launch/slurm.sbatch in a one-node allocation, with an `srun` stand-in that starts the one
    task as Slurm would (its step variables): the trainer builds MultiWorkerMirroredStrategy from
    TF's SlurmClusterResolver, without TF_CONFIG. (Two nodes cannot share port 8888 here.)"""
    with socket.socket() as probe:
        try:
            probe.bind(("", 8888))  # SlurmClusterResolver's port.
        except OSError:
            pytest.skip("port 8888 is in use")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == --* ]]; do shift; done  # srun\'s own options\n'
        "export SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=1 SLURM_STEP_NODELIST=localhost "
        "SLURMD_NODENAME=localhost\n"
        'exec "$@"\n'
    )
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in testutil.ENV.items() if not k.startswith("SLURM") and k != "TF_CONFIG"}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="1",
        SLURM_SUBMIT_DIR=str(testutil.REPO),
    )
    workdir = tmp_path / "run"
    flags = testutil.main_flags(workdir, *RUN, data_dir=data_dir)
    result = subprocess.run(
        ["bash", f"{testutil.REPO}/launch/slurm.sbatch", *flags],
        cwd=tmp_path,  # It runs in SLURM_SUBMIT_DIR (sbatch runs a copy of the script).
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas: 1 (workers: 1)" in result.stderr
    assert [s for s, _ in logged(workdir, "loss")] == list(range(5, 31, 5))


def test_sigterm_to_one_worker_checkpoints_both_and_the_launcher_resumes(
    straight, tmp_path, data_dir
):
    process = launch(tmp_path, data_dir, env=chief_held_at(15, tmp_path))
    wait_for_step(tmp_path, 5, process)
    (chief,) = workers_of(tmp_path, module="hold_for_signal")
    os.kill(chief, signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert "exit 42 (preempted); resuming" in stderr
    assert stderr.count("resumed at step") == 2  # Both workers restored the same checkpoint.
    assert_bitwise_equal(straight[0], tmp_path, step=30, has_dropout=False)
    assert [s for s, _ in logged(tmp_path, "loss")] == list(range(5, 31, 5))


def start_worker(index: int, hosts: list[str], workdir, data_dir, module: str, *extra: str):
    """One worker started as launch/multi_worker.sh would, but as `python -m module` (a test
    harness from tests/ for the worker that misbehaves)."""
    tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
    command = testutil.main_command(
        workdir,
        *RUN,
        "--config.distribution.strategy=multi_worker",
        *extra,
        data_dir=data_dir,
        module=module,
    )
    return subprocess.Popen(
        command,
        cwd=testutil.REPO,
        env={**testutil.INJECTION_ENV, "TF_CONFIG": json.dumps(tf_config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# How long the surviving worker may take to exit after its peer is killed. Measured on loopback
# (2 CPU cores, TF 2.21): 4-5 s from the SIGKILL to the survivor's exit; the rest is margin for a
# loaded machine.
LOST_WORKER_BOUND_SECONDS = 30


def test_a_killed_worker_ends_the_other_with_43_naming_it_and_a_relaunch_resumes(
    straight, tmp_path, data_dir
):
    """Worker 1 stalls before the train loop after step 15 (tests/stall_injection.py), with
    checkpoint 15 written; it is SIGKILLed there while the chief waits in the loop's collectives.
    The chief exits 43 within the bound with one line naming worker 1; both relaunched resume
    from step 15 and end bitwise equal to the uninterrupted run."""
    hosts = [f"127.0.0.1:{port}" for port in testutil.free_ports(2)]
    chief = start_worker(0, hosts, tmp_path, data_dir, "trainer.main")
    stalled = start_worker(
        1, hosts, tmp_path, data_dir, "stall_injection", "--stall_at_call=4", "--stall_seconds=300"
    )
    try:
        wait_for_step(tmp_path, 15, chief)
        manifest = tmp_path / "checkpoints" / "ckpt-15.manifest.json"
        while not manifest.exists():
            time.sleep(0.05)
        time.sleep(1.0)  # The chief is in the next train loop, waiting for worker 1.
        os.killpg(stalled.pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = chief.communicate(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        for worker in (chief, stalled):
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    assert chief.returncode == 43, stderr[-3000:]
    assert seconds < LOST_WORKER_BOUND_SECONDS
    (line,) = [line for line in stderr.splitlines() if "lost contact" in line]
    assert line.startswith("error: lost contact with worker 1 (UnavailableError: "), line
    assert line.endswith("the run resumes from the last complete checkpoint (step 15); exit 43")
    print(f"survivor exited {seconds:.1f} s after the SIGKILL")  # Shown with pytest -s.

    relaunch = launch(tmp_path, data_dir)
    _, stderr = relaunch.communicate(timeout=600)
    assert relaunch.returncode == 0, stderr[-3000:]
    assert stderr.count("resumed at step 15") == 2
    assert_bitwise_equal(straight[0], tmp_path, step=30, has_dropout=False)


def test_override_file_is_applied_by_every_worker_at_the_same_step(straight, tmp_path, data_dir):
    """The chief reads lr_override.json and broadcasts it. Reference: the same LR change made by
    a milestone, which every worker applies from its own config. Had the non-chief kept the old
    LR, its weights, hence the all-reduced gradients and the chief's weights, would differ."""
    overridden, milestone = tmp_path / "overridden", tmp_path / "milestone"
    overridden.mkdir()
    (overridden / "lr_override.json").write_text('{"multiply": 0.5}')  # Read at step 5.
    process = launch(overridden, data_dir)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    applied = [line for line in stderr.splitlines() if line.startswith("worker ")]
    assert all("manual override" in line for line in applied)
    assert sorted(line.split(":", 1)[0] for line in applied) == ["worker 0", "worker 1"]
    assert len({line.split(":", 1)[1] for line in applied}) == 1  # The same event, same step.
    assert (overridden / "lr_override.applied-5.json").exists()  # Renamed once, by the chief.
    assert not (overridden / "lr_override.json").exists()
    halved = [(s, lr / 2) if s > 5 else (s, lr) for s, lr in logged(straight[0], "learning_rate")]
    np.testing.assert_allclose(
        [lr for _, lr in logged(overridden, "learning_rate")], [lr for _, lr in halved], rtol=1e-6
    )

    process = launch(
        milestone,
        data_dir,
        "--config.lr.milestones=(5,)",
        "--config.lr.milestones_unit=steps",
        "--config.lr.milestone_values=(0.5,)",
    )
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    a, b = testutil.checkpoint_values(overridden, 30), testutil.checkpoint_values(milestone, 30)
    assert a.keys() == b.keys()
    for name in a:
        if "milestones_done" not in name:  # 1 after the milestone, 0 after the override.
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_worker_stuck_past_the_collective_timeout_ends_the_other_with_43(tmp_path, data_dir):
    """Worker 1 stalls 60 s in its host code (alive: heartbeats flow, so only the collective
    timeout can end the wait); the chief gives up after 10 s in its collective."""
    hosts = [f"127.0.0.1:{port}" for port in testutil.free_ports(2)]
    timeout = "--config.distribution.collective_timeout_seconds=10"
    chief = start_worker(0, hosts, tmp_path, data_dir, "trainer.main", timeout)
    stalled = start_worker(
        1,
        hosts,
        tmp_path,
        data_dir,
        "stall_injection",
        timeout,
        "--stall_at_call=4",
        "--stall_seconds=60",
    )
    try:
        _, stderr = chief.communicate(timeout=300)
    finally:
        for worker in (chief, stalled):
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    assert chief.returncode == 43, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if "lost contact" in line]
    assert "(DeadlineExceededError: a collective waited longer than " in line, line
    assert "distribution.collective_timeout_seconds=10" in line
    assert "resumes from the last complete checkpoint (step 15)" in line

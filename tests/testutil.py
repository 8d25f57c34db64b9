"""Helpers shared by the tests (imported as `testutil`; pytest puts tests/ on sys.path)."""

import os
import subprocess
import sys

import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mirrored(num_replicas: int) -> tf.distribute.Strategy:
    """Mirrored over the first `num_replicas` logical CPUs (the CPU stand-in for GPUs/TPUs).

    Reduction through one device: collective all-reduces of strategies of different sizes in one
    process collide on group keys ("joining a group with size 4, but that group has size 2").
    The end-to-end tests run each strategy in its own process with TF's default reduction.
    """
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_replicas)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def main_command(
    workdir,
    *overrides: str,
    data_dir: str,
    module: str = "trainer.main",
    config: str = "configs/default.py",
) -> list:
    return [
        sys.executable,
        "-m",
        module,
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        *overrides,
    ]


def run_main(
    workdir,
    *overrides: str,
    data_dir: str,
    timeout: int = 600,
    check: bool = True,
    config: str = "configs/default.py",
):
    """Runs `python -m trainer.main` in a fresh process, as a user would."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        main_command(workdir, *overrides, data_dir=data_dir, config=config),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result

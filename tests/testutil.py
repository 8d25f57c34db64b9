"""Helpers shared by the tests (imported as `testutil`; pytest puts tests/ on sys.path)."""

import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import tensorflow as tf

from configs import default as default_config
from trainer import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}  # For the subprocesses: TF's C++ logs off.
# For the test harnesses in tests/ (nan_injection, stall_injection, ...) run as `python -m NAME`.
INJECTION_ENV = {**ENV, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# What the tests run in unless they say otherwise: `precision=auto` would pick mixed_bfloat16 on
# CPUs with AMX-BF16 (this project's CI machine has it) and float32 elsewhere, and the tests'
# tolerances (replica equivalences, hand-computed updates) are for float32 on every machine.
# precision_test.py runs the mixed policies.
TEST_PRECISION = "float32"


def config_with(**fields) -> ml_collections.ConfigDict:
    """The default config (in TEST_PRECISION) with `fields` changed; nested fields are given as
    "lr.base"."""
    config = default_config.get_config()
    for name, value in {"precision": TEST_PRECISION, **fields}.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def tiny_run_config(data_dir: str, **fields) -> ml_collections.ConfigDict:
    """The default config shrunk for an in-process end-to-end run of seconds: a tiny MLP on the
    default strategy, 20 updates in loops of 5, eval and checkpoint every 10; `fields` as in
    `config_with` change it further."""
    small = {
        "total_steps": 20,
        "steps_per_loop": 5,
        "log_every_steps": 5,
        "eval_every_steps": 10,
        "checkpoint_every_steps": 10,
        "lr.warmup_steps": 2,
        "model.name": "mlp",
        "model.width": 8,
        "distribution.strategy": "default",
        "dataset.data_dir": data_dir,
    }
    return config_with(**{**small, **fields})


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


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago, for servers a test starts.

    All are bound before any is released, so the OS cannot hand out one port twice; once
    released, another process could take one first (rare; the test then fails to bind).
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def dataset_config(name: str, data_dir: str) -> ml_collections.ConfigDict:
    """The default config's `dataset` part, for dataset `name` in `data_dir`."""
    config = default_config.get_config().dataset
    config.name = name
    config.data_dir = data_dir
    return config


def distributed_steps(strategy, dataset_fn, steps):
    """Per step, the list of per-replica (images, labels[, weights]) numpy tuples, replica order."""
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    result = []
    for step, element in enumerate(dataset):
        if step == steps:
            break
        parts = [strategy.experimental_local_results(value) for value in element]
        result.append([tuple(part[r].numpy() for part in parts) for r in range(len(parts[0]))])
    return result


def main_flags(
    workdir, *overrides: str, data_dir: str, config: str = "configs/default.py"
) -> list[str]:
    """The flags of a trainer command: config, workdir, data_dir, TEST_PRECISION, then
    `overrides`."""
    return [
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        f"--config.precision={TEST_PRECISION}",
        *overrides,
    ]


def main_command(
    workdir,
    *overrides: str,
    data_dir: str,
    module: str = "trainer.main",
    config: str = "configs/default.py",
) -> list[str]:
    flags = main_flags(workdir, *overrides, data_dir=data_dir, config=config)
    return [sys.executable, "-m", module, *flags]


def run_command(command: list[str], *, env=None, timeout: int = 600, check: bool = True):
    """Runs `command` from the repository root in a fresh process; with `check`, a non-zero
    exit fails with the end of its stderr."""
    result = subprocess.run(
        command,
        cwd=REPO,
        env=ENV if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result


def run_with_nan_at(update: int, workdir, *overrides: str, data_dir: str, check: bool = True):
    """`run_main` through tests/nan_injection.py: the loss of `update` is NaN (once)."""
    command = main_command(workdir, *overrides, data_dir=data_dir, module="nan_injection")
    command.append(f"--nan_at_update={update}")
    return run_command(command, env=INJECTION_ENV, check=check)


def run_main(
    workdir,
    *overrides: str,
    data_dir: str,
    timeout: int = 600,
    check: bool = True,
    config: str = "configs/default.py",
):
    """Runs `python -m trainer.main` in a fresh process, as a user would."""
    return run_command(
        main_command(workdir, *overrides, data_dir=data_dir, config=config),
        timeout=timeout,
        check=check,
    )


def start_main(
    workdir,
    *overrides: str,
    data_dir: str,
    config: str = "configs/default.py",
    module: str = "trainer.main",
    hold_at_step: int | None = None,
):
    """Starts `python -m trainer.main` in the background (to signal or kill it), or a test
    harness of tests/ that wraps it (`module`; `overrides` may hold the harness's flags).

    With `hold_at_step` it runs through tests/hold_for_signal.py (spike_injection.py installs
    it too): it stops at that step's loop boundary at the latest, so a test that signals it
    cannot lose the race against its end."""
    if hold_at_step is not None:
        module = "hold_for_signal" if module == "trainer.main" else module
        overrides = (*overrides, f"--hold_at_step={hold_at_step}")
    return subprocess.Popen(
        main_command(workdir, *overrides, data_dir=data_dir, config=config, module=module),
        cwd=REPO,
        env=ENV if module == "trainer.main" else INJECTION_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged(workdir, key: str) -> list[tuple[int, object]]:
    """(step, value) of every metrics.jsonl record that has `key`."""
    return [(r["step"], r[key]) for r in metrics.read_records(workdir) if key in r]


def wait_for_step(workdir, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until a train record at `step` or later is logged; fails if `process` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = workdir / "metrics.jsonl"
        if path.exists() and any(s >= step for s, _ in logged(workdir, "loss")):
            return
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


class Crash(Exception):
    """Raised by `crash_at` from inside a run."""


def _at_train_record(monkeypatch, step: int, action) -> None:
    """Calls `action()` when an in-process run logs the train record of `step` (at the loop
    boundary, before the record is written)."""
    write = metrics.MetricWriter.write

    def acting(self, at, record, kind="train"):
        if at == step and kind == "train":
            action()
        return write(self, at, record, kind)

    monkeypatch.setattr(metrics.MetricWriter, "write", acting)


def crash_at(monkeypatch, step: int) -> None:
    """Makes an in-process run die (like kill -9: no cleanup of its files) when it logs the
    train record of `step`; `monkeypatch.undo()` lets the next run live."""

    def crash():
        raise Crash(step)

    _at_train_record(monkeypatch, step, crash)


def sigterm_at(monkeypatch, step: int) -> None:
    """Sends this process a SIGTERM when an in-process run logs the train record of `step`: the
    run stops at that loop boundary, checkpoints and raises `preemption.Preempted`."""
    _at_train_record(monkeypatch, step, lambda: os.kill(os.getpid(), signal.SIGTERM))


def straight_and_resumed(config, tmp_path, monkeypatch, crash_at_step: int, sigterm: bool = False):
    """Runs `config` in-process straight through, and again with a crash (`crash_at`) at
    `crash_at_step`, or with `sigterm` a SIGTERM there (`sigterm_at`), followed by a rerun that
    resumes; returns the two workdirs."""
    from trainer import preemption, train

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.train_and_evaluate(config, str(straight))
    (sigterm_at if sigterm else crash_at)(monkeypatch, crash_at_step)
    stopped = preemption.Preempted if sigterm else Crash
    try:
        train.train_and_evaluate(config, str(resumed))
    except stopped:
        pass
    else:
        raise AssertionError(f"the run did not reach step {crash_at_step} to stop there")
    monkeypatch.undo()
    train.train_and_evaluate(config, str(resumed))
    return straight, resumed


def checkpoint_values(workdir, step: int) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(workdir / "checkpoints" / f"ckpt-{step}"))
    names = [n for n in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in n]
    return {name: reader.get_tensor(name) for name in names}


def assert_bitwise_equal(workdir_a, workdir_b, step: int, has_dropout: bool = True) -> None:
    """The two runs' checkpoints at `step` hold the same values, bit for bit, for all state."""
    a, b = checkpoint_values(workdir_a, step), checkpoint_values(workdir_b, step)
    assert a.keys() == b.keys()
    assert any("optimizer" in n for n in a)
    assert any("rng" in n for n in a) == has_dropout
    assert any("lr_state" in n for n in a) and any("examples_seen" in n for n in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def run_cli_in_process(main, *argv: str) -> None:
    """Runs a command-line tool's `main` in this process with `argv` as its flags, as
    `python -m TOOL ARGV` would parse them (flags are defined at module level), then resets
    the flags for the next test. ml_collections reads `sys.argv` to find `--config.FIELD`
    overrides, so it is set too."""
    from unittest import mock

    from absl import flags

    from trainer import cli

    flags.FLAGS.unparse_flags()
    try:
        with mock.patch.object(sys, "argv", ["tool", *argv]):
            cli.parse_flags(sys.argv)
            main([])
    finally:
        flags.FLAGS.unparse_flags()

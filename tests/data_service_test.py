"""Tests for trainer/data_service/: train input made by tf.data service workers, on loopback."""

import contextlib
import pathlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
import testutil

from trainer import data, data_service, preprocessing, sources
from trainer.errors import ConfigError, UserError

GLOBAL_BATCH = 32
SERVER_START_SECONDS = 120  # Ample for a server's start (TensorFlow's import) on a loaded machine.


def _wait_for_line(log: pathlib.Path, text: str, process: subprocess.Popen) -> None:
    """Returns once `text` is in `log`, `process`'s stderr; fails with the log's tail if the
    process ends or SERVER_START_SECONDS pass first."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    while True:
        ended = process.poll() is not None  # Before the read: a line written before the end counts.
        if text in log.read_text():
            return
        if ended or time.monotonic() > deadline:
            state = "ended" if ended else f"still running after {SERVER_START_SECONDS} s"
            pytest.fail(f"no {text!r} from {process.args} ({state}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def _service(num_workers: int, log_dir: pathlib.Path) -> Iterator[str]:
    """HOST:PORT of a dispatcher with `num_workers` workers, each a process started with the
    documented command, without op determinism as real ones. (In-process servers took up to
    minutes to stop after the tests' jobs.) Their stderr goes to files in `log_dir`: a pipe
    nobody reads would stall a server once full."""
    dispatcher_port, *worker_ports = testutil.free_ports(num_workers + 1)
    address = f"127.0.0.1:{dispatcher_port}"
    module = [sys.executable, "-m", "trainer.data_service"]
    commands = [[*module, f"--port={dispatcher_port}"]] + [
        [*module, f"--port={port}", f"--dispatcher={address}", "--host=127.0.0.1"]
        for port in worker_ports
    ]
    logs = [log_dir / f"server_{i}.log" for i in range(len(commands))]
    processes = []
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as stderr:
                processes.append(
                    subprocess.Popen(command, cwd=testutil.REPO, env=testutil.ENV, stderr=stderr)
                )
        for process, log in zip(processes[1:], logs[1:], strict=True):
            _wait_for_line(log, "serving dispatcher", process)  # Registered with the dispatcher.
        yield address
    finally:
        for process in processes:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[str]:
    """One worker."""
    with _service(1, tmp_path_factory.mktemp("data_service")) as address:
        yield address


@pytest.fixture(scope="module")
def split(data_dir) -> sources.Split:
    return sources.load_split(testutil.dataset_config("tfscale_shapes", data_dir), "train")


def _steps(split, start_position: int, steps: int, service_address: str = "", augment=False):
    """`steps` distributed batches on Mirrored over 2 logical CPUs (per step, per replica)."""
    config = testutil.dataset_config("tfscale_shapes", "")
    if augment:
        config.image_size, config.augment = 24, "inception_crop"
    dataset_fn = data.train_dataset_fn(
        split,
        global_batch_size=GLOBAL_BATCH,
        start_position=start_position,
        seed=3,
        preprocessing=preprocessing.from_config(config),
        service_address=service_address,
    )
    return testutil.distributed_steps(testutil.mirrored(2), dataset_fn, steps)


def _assert_same_steps(a, b) -> None:
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b, strict=True):
        for replica_a, replica_b in zip(step_a, step_b, strict=True):
            for part_a, part_b in zip(replica_a, replica_b, strict=True):
                np.testing.assert_array_equal(part_a, part_b)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("start_position", [0, 7 * GLOBAL_BATCH + 5])
def test_one_worker_gives_the_local_pipelines_batches(split, service, start_position, augment):
    local = _steps(split, start_position, 8, augment=augment)
    served = _steps(split, start_position, 8, service, augment=augment)
    _assert_same_steps(served, local)
    assert local[0][0][0].shape == (GLOBAL_BATCH // 2, *((24, 24) if augment else (32, 32)), 3)


def test_a_resumed_stream_on_the_service_continues_the_straight_one(split, service):
    """A resume builds a new job at the checkpoint's position: no state lives in the service."""
    straight = _steps(split, 0, 10, service)
    resumed = _steps(split, 6 * GLOBAL_BATCH, 4, service)
    _assert_same_steps(resumed, straight[6:])


@pytest.mark.slow
def test_training_through_the_service_is_bitwise_the_local_run_also_resumed(
    tmp_path, data_dir, service, monkeypatch
):
    from trainer import train

    fields = {"dataset.image_size": 24, "dataset.augment": "inception_crop"}
    local = tmp_path / "local"
    train.train_and_evaluate(testutil.tiny_run_config(data_dir, **fields), str(local))
    config = testutil.tiny_run_config(data_dir, **fields, **{"dataset.service_address": service})
    straight, resumed = testutil.straight_and_resumed(config, tmp_path, monkeypatch, 15)
    testutil.assert_bitwise_equal(local, straight, 20, has_dropout=False)
    testutil.assert_bitwise_equal(local, resumed, 20, has_dropout=False)


@pytest.mark.parametrize(
    "address",
    ["localhost", "localhost:", ":5050", "localhost:0", "localhost:70000", "http://h:1", "h:1 "],
)
def test_malformed_addresses_are_refused(split, address):
    with pytest.raises(ConfigError, match=r"^dataset\.service_address \(.*\) is not HOST:PORT"):
        data_service.check(address, split)


def test_a_split_read_through_python_is_refused():
    record_split = sources.RecordSplit(
        records=[], features=None, image_key="image", label_key="label"
    )
    with pytest.raises(ConfigError, match=r"py_function, which tf.data service workers cannot"):
        data_service.check("localhost:5050", record_split)


def test_no_dispatcher_at_the_address_is_one_line_at_start_up(split, data_dir):
    """The tf.data client would retry for minutes inside the first train loop instead. Only the
    check is timed: the rest of start-up (strategy, splits) takes longer on a loaded machine."""
    from trainer import setup

    (port,) = testutil.free_ports(1)
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(
        UserError, match=r"no tf.data dispatcher answers there \(.*\); start one"
    ) as e:
        data_service.check(address, split)
    assert time.monotonic() - started < data_service.CONNECT_TIMEOUT_SECONDS
    assert "\n" not in str(e.value)
    config = testutil.tiny_run_config(data_dir, **{"dataset.service_address": address})
    with pytest.raises(UserError, match=f"^{re.escape(str(e.value))}$"):
        setup.prepare(config)


def test_a_dispatcher_that_does_not_answer_in_time_is_one_line(split, monkeypatch):
    """A closed port refuses at once; a host that drops the connection attempt (a firewall, a
    machine that is down) is given up after CONNECT_TIMEOUT_SECONDS."""
    calls = []

    def timing_out(*args, **kwargs):
        calls.append((args, kwargs))
        raise TimeoutError("timed out")  # What `create_connection` raises when its timeout ends.

    monkeypatch.setattr(socket, "create_connection", timing_out)
    address = "192.0.2.1:5050"  # TEST-NET-1: reserved, never a real host.
    with pytest.raises(UserError) as e:
        data_service.check(address, split)
    assert calls == [((("192.0.2.1", 5050),), {"timeout": data_service.CONNECT_TIMEOUT_SECONDS})]
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(
        f"dataset.service_address ({address}): no tf.data dispatcher answers there (TimeoutError); "
        "start one with `python -m trainer.data_service --port=PORT`"
    )


@pytest.mark.slow
def test_two_worker_processes_make_each_batch_once_in_any_order(split, tmp_path):
    """What more workers keep: each batch once, bitwise. Their order is not checked: it is the
    order the workers finish them in, which may or may not be the stream's."""
    with _service(2, tmp_path) as address:
        served = [s[r] for s in _steps(split, 0, 60, address, augment=True) for r in range(2)]
    local = [s[r] for s in _steps(split, 0, 100, "", augment=True) for r in range(2)]
    position = {labels.tobytes(): i for i, (_, labels) in enumerate(local)}
    order = [position[labels.tobytes()] for _, labels in served]  # Each a batch of the stream...
    for (images, _), i in zip(served, order, strict=True):  # ...made bitwise as here...
        np.testing.assert_array_equal(images, local[i][0])
    assert len(set(order)) == len(order)  # ...none twice (a `Dataset.counter` source: each twice).
    assert min(order) == 0

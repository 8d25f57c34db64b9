"""Tests for trainer/distribute.py: strategies by name, topology facts, errors that say the fix."""

import json
import time
import types

import pytest
import tensorflow as tf

from configs import default as default_config
from trainer import distribute


def _distribution(strategy: str, cpu_replicas: int = 0, tpu: str = ""):
    config = default_config.get_config().distribution
    config.strategy = strategy
    config.cpu_replicas = cpu_replicas
    config.tpu = tpu
    return config


@pytest.mark.parametrize(
    "name, cpu_replicas, strategy_type, replicas",
    [
        ("default", 0, None, 1),
        ("default", 2, None, 1),  # Splitting the CPU does not make the default strategy mirror.
        ("one_device", 0, tf.distribute.OneDeviceStrategy, 1),
        ("mirrored", 0, tf.distribute.MirroredStrategy, 1),
        ("mirrored", 2, tf.distribute.MirroredStrategy, 2),
        ("mirrored", 4, tf.distribute.MirroredStrategy, 4),
        ("auto", 0, None, 1),  # No GPU here: auto is the default strategy...
        ("auto", 1, None, 1),
        ("auto", 2, tf.distribute.MirroredStrategy, 2),  # ...or mirrors over logical CPUs.
        ("auto", 4, tf.distribute.MirroredStrategy, 4),
    ],
)
def test_create_strategy_and_topology(name, cpu_replicas, strategy_type, replicas):
    assert not tf.config.list_logical_devices("GPU")  # The expectations are for a CPU machine.
    strategy = distribute.create_strategy(_distribution(name, cpu_replicas))
    if strategy_type is None:
        assert strategy is tf.distribute.get_strategy()
        assert not tf.distribute.has_strategy()
    else:
        assert type(strategy) is strategy_type
    assert strategy.num_replicas_in_sync == replicas
    if strategy_type is tf.distribute.MirroredStrategy:
        devices = sorted(d.split("/")[-1].upper() for d in strategy.extended.worker_devices)
        assert devices == [f"DEVICE:CPU:{i}" for i in range(replicas)]

    topology = distribute.topology(strategy, name)
    assert topology == distribute.Topology(
        num_replicas=replicas, num_workers=1, worker_index=0, is_chief=True, strategy_name=name
    )


def test_mirrored_strategy_runs_one_replica_per_logical_cpu():
    strategy = distribute.create_strategy(_distribution("mirrored", 4))
    ids = strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
    assert sorted(int(v) for v in strategy.experimental_local_results(ids)) == [0, 1, 2, 3]


def test_unknown_strategy_lists_the_names():
    with pytest.raises(ValueError) as error:
        distribute.create_strategy(_distribution("horovod"))
    message = str(error.value)
    assert "'horovod'" in message
    for name in ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu"):
        assert name in message


def test_negative_cpu_replicas_is_refused():
    with pytest.raises(ValueError, match=r"cpu_replicas \(-1\)"):
        distribute.create_strategy(_distribution("mirrored", -1))


def test_more_cpu_replicas_than_configured_after_start_is_a_strategy_error():
    tf.config.list_logical_devices("CPU")  # TensorFlow is running: devices are fixed now.
    with pytest.raises(distribute.StrategyError, match=r"cpu_replicas \(8\)"):
        distribute.create_strategy(_distribution("mirrored", 8))
    assert len(tf.config.list_logical_devices("CPU")) == 4  # The session's split is unchanged.


@pytest.mark.parametrize("tpu, shown", [("", "local"), ("no-such-tpu", "no-such-tpu")])
def test_tpu_without_tpu_fails_fast_and_never_falls_back_to_cpu(tpu, shown):
    start = time.monotonic()
    with pytest.raises(distribute.StrategyError) as error:  # Not a CPU strategy.
        distribute.create_strategy(_distribution("tpu", tpu=tpu))
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert f"distribution.tpu='{shown}'" in message
    assert "--config.distribution.tpu=NAME" in message
    assert "strategy=auto" in message


def test_multi_worker_without_tf_config_names_it(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(distribute.StrategyError, match="TF_CONFIG"):
        distribute.create_strategy(_distribution("multi_worker"))


def test_multi_worker_with_malformed_tf_config_fails_before_building(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{'cluster': not json")
    with pytest.raises(json.JSONDecodeError):
        distribute.create_strategy(_distribution("multi_worker"))


def _fake_strategy(cluster: dict, task_type: str | None, task_id: int | None, chief: bool):
    """Stands in for a multi-worker strategy, which cannot be built in-process without peers."""
    resolver = types.SimpleNamespace(
        task_type=task_type,
        task_id=task_id,
        cluster_spec=lambda: tf.train.ClusterSpec(cluster),
    )
    return types.SimpleNamespace(
        cluster_resolver=resolver,
        num_replicas_in_sync=sum(len(tasks) for tasks in cluster.values()),
        extended=types.SimpleNamespace(should_checkpoint=chief),
    )


WORKERS = ["localhost:1", "localhost:2"]


@pytest.mark.parametrize(
    "cluster, task_type, task_id, chief, workers, index",
    [
        ({"worker": WORKERS}, "worker", 0, True, 2, 0),
        ({"worker": WORKERS}, "worker", 1, False, 2, 1),
        ({"chief": ["localhost:0"], "worker": WORKERS}, "chief", 0, True, 3, 0),
        ({"chief": ["localhost:0"], "worker": WORKERS}, "worker", 1, False, 3, 1),
        # A TPU's resolver has no chief/worker task: its single client is one worker.
        ({"worker": ["10.0.0.1:8470"]}, None, None, True, 1, 0),
    ],
)
def test_topology_reads_workers_index_and_chief(cluster, task_type, task_id, chief, workers, index):
    strategy = _fake_strategy(cluster, task_type, task_id, chief)
    topology = distribute.topology(strategy, "multi_worker")
    assert topology.num_workers == workers
    assert topology.worker_index == index
    assert topology.is_chief is chief
    assert topology.num_replicas == strategy.num_replicas_in_sync
    assert topology.strategy_name == "multi_worker"

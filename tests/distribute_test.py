"""Tests for trainer/distribute.py: strategies by name, topology facts, errors that say the fix."""

import functools
import json
import logging
import os
import subprocess
import sys
import time
import types

import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer import distribute, hardware
from trainer import setup as setup_lib
from trainer.errors import ConfigError, UserError


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
    assert distribute.describe_devices(strategy) == f"{replicas} x CPU"

    topology = distribute.topology(strategy, name)
    assert topology == distribute.Topology(
        num_replicas=replicas, num_workers=1, worker_index=0, is_chief=True, strategy_name=name
    )


@pytest.mark.parametrize(
    ("name", "cpu_replicas", "shown", "devices"),
    [
        (
            "default",
            0,
            "none (1 replica) | input: prefetched on the host (autotune), copied to the device "
            "in the step",
            [],
        ),
        (
            "one_device",
            0,
            "none (1 replica) | input: prefetched to 1 device, 1 batch ahead (host: autotune)",
            ["CPU:0"],
        ),
        (
            "mirrored",
            2,
            "through one device | input: prefetched to 2 devices, 1 batch ahead (host: autotune)",
            ["CPU:0", "CPU:1"],
        ),
    ],
)
def test_summary_says_how_gradients_are_reduced_and_input_is_prefetched_to_each_device(
    caplog, monkeypatch, data_dir, name, cpu_replicas, shown, devices
):
    """Each replica's batch is already on its device when the step takes it (on the logical
    CPUs: replica 1's on CPU:1, not on the host's CPU:0), train and eval input alike.

    The options are recorded where Setup passes them: where the batches land cannot tell
    input_options() from TF's default InputOptions (fetch to device, 1 batch), which it equals."""
    caplog.set_level(logging.INFO)
    config = testutil.config_with(
        **{
            "distribution.strategy": name,
            "distribution.cpu_replicas": cpu_replicas,
            "dataset.data_dir": data_dir,
        }
    )
    setup = setup_lib.prepare(config)
    summary = [line for line in caplog.text.splitlines() if "devices: " in line]
    assert len(summary) == 1 and f"| all-reduce: {shown} |" in summary[0]
    if not devices:  # The default strategy has no per-replica placement to check.
        return
    made, passed = [], []
    input_options = distribute.input_options
    distribute_datasets = setup.strategy.distribute_datasets_from_function

    def recorded_input_options():
        made.append(input_options())
        return made[-1]

    def recorded_distribute_datasets(dataset_fn, options=None):
        passed.append(options)
        return distribute_datasets(dataset_fn, options)

    monkeypatch.setattr(distribute, "input_options", recorded_input_options)
    monkeypatch.setattr(
        setup.strategy, "distribute_datasets_from_function", recorded_distribute_datasets
    )
    eval_dataset, _ = setup.eval_input()
    for images, *_ in (next(setup.train_iterator(0)), next(iter(eval_dataset))):
        placed = [
            tf.DeviceSpec.from_string(t.device)
            for t in setup.strategy.experimental_local_results(images)
        ]
        assert [f"{d.device_type}:{d.device_index}" for d in placed] == devices
    assert len(passed) == len(made) == 2  # Train and eval input, each with input_options()'s.
    assert all(p is m for p, m in zip(passed, made, strict=True))
    for options in passed:
        assert options.experimental_fetch_to_device is True
        assert options.experimental_per_replica_buffer_size == distribute.DEVICE_PREFETCH_BATCHES


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
    # A UserError: the command line prints it as one `error:` line and exits 1 (train_test.py).
    assert isinstance(error.value, UserError)
    message = str(error.value)
    assert "\n" not in message
    assert f"no TPU is reachable at distribution.tpu='{shown}'" in message
    assert "--config.distribution.tpu=NAME" in message
    assert "strategy=auto" in message


@pytest.fixture
def no_multi_worker_strategy(monkeypatch):
    """Fails the test if a MultiWorkerMirroredStrategy gets built: the checks must come first.

    Without this, building one would also raise on a malformed TF_CONFIG (its resolver parses the
    JSON too), so "fails before building" could not be told from "fails while building"; and a
    real one would set up collectives in the test process.
    """

    def build(*args, **kwargs):
        raise AssertionError("MultiWorkerMirroredStrategy was built")

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", build)


SLURM_TASK = {  # What srun sets for task 1 of a 2-node step (one task per node).
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "1",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURMD_NODENAME": "node2",
}


@pytest.fixture
def cluster_environment(monkeypatch, tmp_path):
    """No TF_CONFIG and no Slurm variables, whatever the test runner has; yields a function
    that sets variables (NAME=value; None unsets NAME).

    `scontrol` and `nvidia-smi` first on PATH record any call: resolving a Slurm cluster must not
    need either (the node list comes from the environment, the GPU count from TensorFlow).
    """
    for name in [n for n in os.environ if n.startswith("SLURM") or n == "TF_CONFIG"]:
        monkeypatch.delenv(name)
    for tool in ("scontrol", "nvidia-smi"):
        (tmp_path / tool).write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/called-{tool}\nexit 1\n')
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    # The stand-in nvidia-smi is there to catch a call, not to make this a GPU host.
    monkeypatch.setattr(hardware, "probe", functools.partial(hardware.probe, which=lambda _: None))

    def set_variables(**variables):
        for name, value in variables.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    yield set_variables
    assert not list(tmp_path.glob("called-*")), "a Slurm or NVIDIA tool was run"


def test_multi_worker_without_tf_config_or_slurm_names_both(
    cluster_environment, no_multi_worker_strategy
):
    with pytest.raises(distribute.StrategyError) as error:
        distribute.create_strategy(_distribution("multi_worker"))
    message = str(error.value)
    for fix in ("TF_CONFIG", "launch/multi_worker.sh", "Slurm", "srun", "launch/slurm.sbatch"):
        assert fix in message


def test_multi_worker_with_malformed_tf_config_fails_before_building(
    cluster_environment, no_multi_worker_strategy
):
    cluster_environment(TF_CONFIG="{'cluster': not json")
    with pytest.raises(json.JSONDecodeError):
        distribute.create_strategy(_distribution("multi_worker"))


def test_multi_worker_with_tf_config_builds_the_strategy(monkeypatch, cluster_environment):
    """The other side of the two tests above: with a valid TF_CONFIG the strategy is built."""
    built = []
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", lambda **kw: built.append(kw))
    cluster_environment(TF_CONFIG=json.dumps({"cluster": {"worker": ["localhost:1"]}}))
    distribute.create_strategy(_distribution("multi_worker"))
    (kwargs,) = built
    assert (
        type(kwargs["cluster_resolver"]) is tf.distribute.cluster_resolver.TFConfigClusterResolver
    )


def test_tf_config_wins_over_slurm(cluster_environment):
    """launch/multi_worker.sh inside a Slurm allocation: its explicit TF_CONFIG is the cluster."""
    tf_config = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}
    cluster_environment(**SLURM_TASK, TF_CONFIG=json.dumps(tf_config))
    resolver = distribute.multi_worker_cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": ["a:1", "b:1"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


@pytest.mark.parametrize(
    "task, workers, index",
    [
        ({}, ["node1:8888", "node2:8888"], 1),
        ({"SLURM_PROCID": "0", "SLURMD_NODENAME": "node1"}, ["node1:8888", "node2:8888"], 0),
        # TF's resolver lists nodes sorted as strings (node10 before node9), Slurm numbers
        # tasks in its node order (node9 is task 0): the index is this node's place in the list.
        (
            {"SLURM_STEP_NODELIST": "node[9-10]", "SLURM_PROCID": "0", "SLURMD_NODENAME": "node9"},
            ["node10:8888", "node9:8888"],
            1,
        ),
        # Without SLURMD_NODENAME the index is SLURM_PROCID; 4 nodes, tasks per node as "1(x4)".
        (
            {
                "SLURM_STEP_NUM_TASKS": "4",
                "SLURM_STEP_NODELIST": "gpu[01-03],cpu7",
                "SLURM_STEP_TASKS_PER_NODE": "1(x4)",
                "SLURM_PROCID": "2",
                "SLURMD_NODENAME": None,
            },
            ["cpu7:8888", "gpu01:8888", "gpu02:8888", "gpu03:8888"],
            2,
        ),
    ],
)
def test_slurm_task_resolves_its_cluster(cluster_environment, task, workers, index):
    cluster_environment(**{**SLURM_TASK, **task})
    resolver = distribute.multi_worker_cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": workers}
    assert (resolver.task_type, resolver.task_id) == ("worker", index)
    assert resolver.num_accelerators() == {"GPU": 0}  # This machine has none.
    assert resolver.rpc_layer == "grpc"
    node = os.environ.get("SLURMD_NODENAME")
    if node:  # Each task's address is on its own node.
        assert resolver.cluster_spec().task_address("worker", index) == f"{node}:8888"


def test_slurm_gpus_per_task_are_the_gpus_tensorflow_sees(monkeypatch, cluster_environment):
    """A wrong count would be a silent CPU run (or an idle GPU): it is TF's, not nvidia-smi's."""
    real = tf.config.list_physical_devices
    monkeypatch.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: ["GPU:0", "GPU:1", "GPU:2", "GPU:3"] if kind == "GPU" else real(kind),
    )
    cluster_environment(**SLURM_TASK, CUDA_VISIBLE_DEVICES="4,5,6,7")
    resolver = distribute.multi_worker_cluster_resolver()
    assert resolver.num_accelerators() == {"GPU": 4}
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:8888", "node2:8888"]}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"  # Slurm's choice, left alone.


def test_slurm_strategy_is_built_on_the_slurm_cluster(monkeypatch, cluster_environment):
    built = []
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", lambda **kw: built.append(kw))
    cluster_environment(**SLURM_TASK)
    distribute.create_strategy(_distribution("multi_worker"))
    (kwargs,) = built
    resolver = kwargs["cluster_resolver"]
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:8888", "node2:8888"]}
    assert resolver.task_id == 1


@pytest.mark.parametrize(
    "task, shown",
    [
        # Two tasks on one node: one process per node drives all of its GPUs.
        (
            {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "node1"},
            ["Requested 2 tasks but only 1 were assigned", "SLURM_STEP_NODELIST=node1"],
        ),
        # The batch script itself (no srun): a job but no step.
        (
            {"SLURM_STEP_NUM_TASKS": None, "SLURM_STEP_NODELIST": None},
            ["SLURM_STEP_NUM_TASKS not found", "SLURM_STEP_NUM_TASKS=(unset)"],
        ),
        ({"SLURMD_NODENAME": "login1"}, ["SLURMD_NODENAME=login1", "['node1', 'node2']"]),
    ],
)
def test_slurm_step_that_is_not_one_task_per_node_is_refused(
    cluster_environment, no_multi_worker_strategy, task, shown
):
    cluster_environment(**{**SLURM_TASK, **task})
    with pytest.raises(distribute.StrategyError) as error:
        distribute.create_strategy(_distribution("multi_worker"))
    message = str(error.value)
    for part in [*shown, "srun", "SLURM_PROCID=1"]:
        assert part in message


def _fake_strategy(
    cluster: dict, task_type: str | None, task_id: int | None, chief: bool, replicas: int
):
    """Stands in for a multi-worker strategy, which cannot be built in-process without peers."""
    resolver = types.SimpleNamespace(
        task_type=task_type,
        task_id=task_id,
        cluster_spec=lambda: tf.train.ClusterSpec(cluster),
    )
    return types.SimpleNamespace(
        cluster_resolver=resolver,
        num_replicas_in_sync=replicas,
        extended=types.SimpleNamespace(should_checkpoint=chief),
    )


WORKERS = ["localhost:1", "localhost:2"]


# Replicas differ from workers in every case (several devices per worker, 8 cores on one TPU
# host): a topology that read one for the other fails.
@pytest.mark.parametrize(
    "cluster, task_type, task_id, chief, replicas, workers, index",
    [
        ({"worker": WORKERS}, "worker", 0, True, 8, 2, 0),
        ({"worker": WORKERS}, "worker", 1, False, 8, 2, 1),
        ({"chief": ["localhost:0"], "worker": WORKERS}, "chief", 0, True, 6, 3, 0),
        ({"chief": ["localhost:0"], "worker": WORKERS}, "worker", 1, False, 6, 3, 1),
        # A TPU's resolver has no chief/worker task: its single client is one worker.
        ({"worker": ["10.0.0.1:8470"]}, None, None, True, 8, 1, 0),
    ],
)
def test_topology_reads_workers_index_and_chief(
    cluster, task_type, task_id, chief, replicas, workers, index
):
    strategy = _fake_strategy(cluster, task_type, task_id, chief, replicas)
    topology = distribute.topology(strategy, "tpu" if task_type is None else "multi_worker")
    assert topology == distribute.Topology(
        num_replicas=replicas,
        num_workers=workers,
        worker_index=index,
        is_chief=chief,
        strategy_name="tpu" if task_type is None else "multi_worker",
    )


def test_multi_worker_gets_the_collective_timeout_and_all_reduce(monkeypatch, cluster_environment):
    built = []
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", lambda **kw: built.append(kw))
    cluster_environment(TF_CONFIG=json.dumps({"cluster": {"worker": ["localhost:1"]}}))
    distribution = _distribution("multi_worker")
    distribution.collective_timeout_seconds = 30.0
    distribution.all_reduce = "nccl"
    distribute.create_strategy(distribution)
    options = built[0]["communication_options"]
    assert options.timeout_seconds == 30.0
    assert options.implementation == tf.distribute.experimental.CommunicationImplementation.NCCL


def test_multi_worker_defaults_leave_tf_defaults(monkeypatch, cluster_environment):
    built = []
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", lambda **kw: built.append(kw))
    cluster_environment(TF_CONFIG=json.dumps({"cluster": {"worker": ["localhost:1"]}}))
    distribute.create_strategy(_distribution("multi_worker"))
    options = built[0]["communication_options"]
    assert options.timeout_seconds is None  # 0 = no timeout.
    assert options.implementation == tf.distribute.experimental.CommunicationImplementation.AUTO


@pytest.mark.parametrize(
    "strategy, field, value, shown",
    [
        ("multi_worker", "all_reduce", "hierarchical", "is not one of auto, ring, nccl"),
        ("multi_worker", "collective_timeout_seconds", -1.0, "must be >= 0; 0 = off"),
        ("multi_worker", "heartbeat_timeout_seconds", -5.0, "must be >= 0; 0 = off"),
        ("mirrored", "all_reduce", "nccl", "applies to distribution.strategy='multi_worker' only"),
        ("auto", "collective_timeout_seconds", 60.0, "applies to distribution.strategy="),
        ("default", "heartbeat_timeout_seconds", 5.0, "leave it at 0"),
    ],
)
def test_multi_worker_fields_are_checked(no_multi_worker_strategy, strategy, field, value, shown):
    distribution = _distribution(strategy)
    distribution[field] = value
    with pytest.raises(ConfigError) as error:
        distribute.create_strategy(distribution)
    assert shown in str(error.value) and f"distribution.{field}" in str(error.value)


@pytest.mark.slow  # A cluster on loopback: ~5 s.
def test_heartbeat_timeout_reaches_tf_coordination_service(tmp_path):
    """Read back from TF's context in a fresh process (the setting goes through TF internals
    that a TF upgrade may move: this fails then). One worker, so no peer is needed."""
    script = (
        "import json, os\n"
        "from configs import default\n"
        "from trainer import distribute\n"
        "from tensorflow.python.eager import context\n"
        "config = default.get_config().distribution\n"
        "config.strategy, config.devices = 'multi_worker', 'cpu'\n"
        "config.heartbeat_timeout_seconds = 2.5\n"
        "strategy = distribute.create_strategy(config)\n"
        "service = context.context().coordination_service\n"
        "print(service.heartbeat_timeout_in_ms, service.service_leader)\n"
        "print(strategy.num_replicas_in_sync)\n"
    )
    (port,) = testutil.free_ports(1)
    env = {
        **testutil.ENV,
        "TF_CONFIG": json.dumps(
            {"cluster": {"worker": [f"127.0.0.1:{port}"]}, "task": {"type": "worker", "index": 0}}
        ),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=testutil.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["2500", "/job:worker/replica:0/task:0", "1"]


def test_mirrored_over_gpus_is_said_to_reduce_with_nccl(monkeypatch):
    """MirroredStrategy picks NCCL when every device is a GPU (no GPU here: a stand-in with
    GPU device names, which is all the description reads). That is TF's choice only while
    create_strategy passes no cross_device_ops: checked on a host whose TF lists two GPUs."""
    gpus = [f"/job:localhost/replica:0/task:0/device:GPU:{i}" for i in range(2)]
    strategy = types.SimpleNamespace(
        num_replicas_in_sync=2, extended=types.SimpleNamespace(worker_devices=gpus)
    )
    assert distribute.describe_all_reduce(strategy, "auto") == "NCCL"

    list_physical_devices = tf.config.list_physical_devices
    physical_gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in (0, 1)]
    monkeypatch.setattr(
        tf.config,
        "list_physical_devices",
        lambda kind=None: physical_gpus if kind == "GPU" else list_physical_devices(kind),
    )
    # TF's runtime has no such GPUs to configure.
    monkeypatch.setattr(distribute, "configure_gpu_memory", lambda gpus, gpu_memory: None)
    built = []
    monkeypatch.setattr(
        tf.distribute, "MirroredStrategy", lambda *args, **kwargs: built.append((args, kwargs))
    )
    gpu_box = hardware.Hardware(
        nvidia_gpus=2, nvidia_smi=True, tpu_chips=0, tpu_accelerator_type="", cpu_flags=frozenset()
    )
    distribute.create_strategy(_distribution("mirrored"), gpu_box)
    assert built == [((None,), {})]  # All GPUs; the reduction left to TF.

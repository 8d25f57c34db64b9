"""Builds the tf.distribute strategy named in the config and reports the topology it gives."""

import dataclasses
import json
import os

import ml_collections
import tensorflow as tf

from trainer import hardware as hardware_lib
from trainer.errors import ConfigError, UserError


class StrategyError(UserError):
    """The requested strategy cannot be built here; the message says what to change."""


STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
DEVICES = ("auto", "cpu")  # distribution.devices: cpu = train on the CPU on purpose.
# distribution.all_reduce: how MultiWorkerMirroredStrategy's collectives are carried out.
ALL_REDUCE = {
    "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """The facts about the running cluster that the plan and the outer loop need."""

    num_replicas: int
    num_workers: int
    worker_index: int
    is_chief: bool
    strategy_name: str


def configure_cpu_replicas(num_replicas: int) -> None:
    """Splits the host CPU into `num_replicas` logical devices so Mirrored can use them.

    This must run before TensorFlow initializes its devices (i.e. before any op runs), which is
    why `create_strategy` calls it first. It is a no-op for 0 or 1.
    """
    if num_replicas <= 1:
        return
    (cpu,) = tf.config.list_physical_devices("CPU")
    existing = tf.config.get_logical_device_configuration(cpu) or []
    if len(existing) >= num_replicas:  # Already split (e.g. by a test session): use the first N.
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)]
        )
    except RuntimeError as error:
        raise StrategyError(
            f"distribution.cpu_replicas ({num_replicas}) must be configured before TensorFlow "
            "starts; create the strategy before running any op"
        ) from error


def _cpu_device_names(num_replicas: int) -> list[str]:
    return [f"/cpu:{i}" for i in range(num_replicas)]


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    """Connects to a TPU; never falls back to CPU, since a silent CPU run wastes the job."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    # OSError: a TPU name is looked up through the GCE metadata server (URLError without it).
    except (ValueError, tf.errors.OpError, RuntimeError, OSError) as error:
        raise StrategyError(
            f"distribution.strategy='tpu' but no TPU is reachable at distribution.tpu="
            f"'{tpu or 'local'}' ({type(error).__name__}: {str(error).splitlines()[0]}); run on "
            "a Cloud TPU VM with the TPU build installed "
            f"({hardware_lib.TPU_INSTALL}), set --config.distribution.tpu=NAME, or use "
            "strategy=auto for CPU/GPU"
        ) from error
    return tf.distribute.TPUStrategy(resolver)


def _slurm_variables() -> str:
    names = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")
    return ", ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in names)


def _slurm_cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """The cluster of the Slurm job step this process is a task of, one task per node.

    TF's SlurmClusterResolver reads the step (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_STEP_NODELIST; it runs no Slurm command) and gives each node's task the address
    node:8888 (its `port_base`). Its answer is passed on through a SimpleClusterResolver with two
    corrections:
    - GPUs: it can only count NVIDIA GPUs with nvidia-smi and cannot describe a node without any
      (tensorflow/tensorflow#56894), and MultiWorkerMirroredStrategy takes the per-worker GPU count
      from the resolver, so a wrong count is a silent CPU run. The count here is the GPUs
      TensorFlow sees, i.e. those Slurm gave the task (CUDA_VISIBLE_DEVICES, cgroups); listing
      physical devices does not start the runtime, so collectives can still be configured.
    - Task index: it lists nodes sorted as strings but numbers tasks by SLURM_PROCID, which
      follows Slurm's node order: in node[9-10], node9 is task 0 but node10 is listed first, and
      each process would claim another's address. The index used is this node's (SLURMD_NODENAME)
      place in the resolver's list, the same order on every node.
    """
    gpus = len(tf.config.list_physical_devices("GPU"))
    try:
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
            tasks_per_node=1,  # One process drives all GPUs of its node.
            gpus_per_node=max(gpus, 1),  # >= 1: with 0 it builds an empty cluster (see above).
            gpus_per_task=max(gpus, 1),
            auto_set_gpu=False,  # Slurm has already set the task's CUDA_VISIBLE_DEVICES.
        )
        cluster = slurm.cluster_spec()
    except (RuntimeError, ValueError) as error:  # Missing step variables, tasks != nodes.
        raise StrategyError(
            f"distribution.strategy='multi_worker' in Slurm job {os.environ['SLURM_JOB_ID']}: "
            f"{error} ({_slurm_variables()}); start one trainer per node with srun "
            "--ntasks-per-node=1 inside the allocation (launch/slurm.sbatch)"
        ) from error
    task_id = slurm.task_id
    node = os.environ.get("SLURMD_NODENAME")  # Set by Slurm in every task's environment.
    if node is not None:
        hosts = [address.rsplit(":", 1)[0] for address in cluster.job_tasks("worker")]
        if node not in hosts:
            raise StrategyError(
                f"this node (SLURMD_NODENAME={node}) is not among the step's nodes {hosts} "
                f"({_slurm_variables()}); start the trainer with srun inside the allocation"
            )
        task_id = hosts.index(node)
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster,
        task_type="worker",
        task_id=task_id,
        num_accelerators={"GPU": gpus},
        rpc_layer="grpc",
    )


def multi_worker_cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """The cluster this process is a worker of: TF_CONFIG if set, else its Slurm job step.

    TF_CONFIG wins because it is explicit: launch/multi_worker.sh sets it, also inside a Slurm
    allocation. Without it, a Slurm task (SLURM_JOB_ID and SLURM_PROCID set, as srun does)
    resolves its cluster from Slurm's variables (see `_slurm_cluster_resolver`).

    Raises:
      StrategyError: neither TF_CONFIG nor a Slurm task, or a Slurm step that is not one task
        per node.
      json.JSONDecodeError: TF_CONFIG is not JSON.
    """
    if "TF_CONFIG" in os.environ:
        json.loads(os.environ["TF_CONFIG"])  # Fails early and clearly on malformed JSON.
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return _slurm_cluster_resolver()
    raise StrategyError(
        "distribution.strategy='multi_worker' needs to know the cluster, from either the "
        "TF_CONFIG environment variable (launch/multi_worker.sh --hosts=... --index=... sets it; "
        "launch/multi_worker_local.sh for workers on one machine) or a Slurm job step (srun, one "
        "task per node: launch/slurm.sbatch); neither TF_CONFIG nor SLURM_JOB_ID/SLURM_PROCID "
        "is set"
    )


def _configure_heartbeats(
    resolver: tf.distribute.cluster_resolver.ClusterResolver, timeout_seconds: float
) -> None:
    """Sets how long TF's coordination service waits for a silent worker before failing the job.

    TF 2.21 has no public API for it: MultiWorkerMirroredStrategy configures the service itself
    (collective_all_reduce_strategy.py) unless the eager context already has a configuration,
    and this writes that configuration first, as the strategy would, plus the heartbeat
    timeout. Private modules, hence imported here and covered by a test that reads the setting
    back. Must run before the strategy starts the runtime.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster = resolver.cluster_spec()
    jobs = [
        coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster.num_tasks(job))
        for job in ("chief", "worker")
        if job in cluster.jobs
    ]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=jobs,
        heartbeat_timeout_in_ms=int(timeout_seconds * 1000),
    )


def _multi_worker_strategy(distribution: ml_collections.ConfigDict) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy with the configured collective timeout, all-reduce and
    heartbeat timeout (0 = TF's default for each: no timeout, AUTO, TF's heartbeat timeout)."""
    resolver = multi_worker_cluster_resolver()
    if distribution.heartbeat_timeout_seconds:
        _configure_heartbeats(resolver, distribution.heartbeat_timeout_seconds)
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=distribution.collective_timeout_seconds or None,
        implementation=ALL_REDUCE[distribution.all_reduce],
    )
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )


def _check_multi_worker_fields(distribution: ml_collections.ConfigDict) -> None:
    """The fields that only MultiWorkerMirroredStrategy reads: checked, and refused elsewhere
    (a timeout set for a strategy that ignores it would be a silent no-op)."""
    if distribution.all_reduce not in ALL_REDUCE:
        raise ConfigError(
            f"distribution.all_reduce ({distribution.all_reduce!r}) is not one of "
            f"{', '.join(ALL_REDUCE)}"
        )
    for field in ("collective_timeout_seconds", "heartbeat_timeout_seconds"):
        if distribution[field] < 0:
            raise ConfigError(f"distribution.{field} ({distribution[field]}) must be >= 0; 0 = off")
    if distribution.strategy == "multi_worker":
        return
    for field, default in (
        ("all_reduce", "auto"),
        ("collective_timeout_seconds", 0),
        ("heartbeat_timeout_seconds", 0),
    ):
        if distribution[field] != default:
            raise ConfigError(
                f"distribution.{field} ({distribution[field]!r}) applies to "
                f"distribution.strategy='multi_worker' only, not {distribution.strategy!r}; "
                f"leave it at {default!r} (mirrored picks NCCL on GPUs by itself)"
            )


GPU_MEMORY_HELP = "'all' (TF's default: take it at start), 'growth' or a limit in MiB, e.g. '20000'"


def configure_gpu_memory(gpus: list, gpu_memory: str) -> None:
    """How much of each GPU's memory TensorFlow takes; before the runtime starts.

    TF's default takes nearly all of it at start-up (fastest, fewest fragmentation surprises);
    `growth` takes it as needed (several jobs on one GPU, or a notebook beside the run); a limit
    in MiB caps it per GPU.
    """
    if gpu_memory == "all":
        return
    if gpu_memory != "growth" and not (gpu_memory.isdigit() and int(gpu_memory) > 0):
        raise ConfigError(
            f"distribution.gpu_memory ({gpu_memory!r}) is not valid; use {GPU_MEMORY_HELP}"
        )
    for gpu in gpus:
        if gpu_memory == "growth":
            tf.config.experimental.set_memory_growth(gpu, True)
        else:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=int(gpu_memory))]
            )


def _refuse_silent_cpu_run(
    name: str, hardware: hardware_lib.Hardware, gpus: list[tf.config.PhysicalDevice]
) -> None:
    """Fails if this host has an accelerator the chosen strategy would leave idle.

    A run that trains on the CPU of a GPU box or a TPU VM wastes the job and says nothing; the
    usual cause is the wrong TensorFlow build, so the message names the install that fixes it.
    """
    on_purpose = "or --config.distribution.devices=cpu to train on the CPU on purpose"
    if hardware.is_tpu_vm and name not in ("auto", "tpu"):
        raise StrategyError(
            f"this host is a Cloud TPU VM ({hardware.describe()}) but distribution.strategy="
            f"{name!r} would train on its CPU; use strategy=auto or tpu, {on_purpose}"
        )
    if hardware.has_nvidia_gpu and not gpus and not hardware.is_tpu_vm:
        raise StrategyError(
            f"this host has NVIDIA GPUs ({hardware.describe()}) but TensorFlow sees none, so the "
            f"run would train on the CPU; install the CUDA build ({hardware_lib.GPU_INSTALL}) "
            f"and check that nvidia-smi works, {on_purpose}"
        )


def create_strategy(
    distribution: ml_collections.ConfigDict, hardware: hardware_lib.Hardware | None = None
) -> tf.distribute.Strategy:
    """Returns the strategy named by `distribution.strategy` (see configs/default.py).

    `hardware` is the host probe (`hardware.probe()` when None): `auto` picks the TPU on a TPU VM,
    and no strategy trains on the CPU of a host whose accelerator TensorFlow cannot see unless
    `distribution.devices` is `cpu`.
    """
    name = distribution.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"distribution.strategy ({name!r}) is not one of {', '.join(STRATEGIES)}")
    if distribution.devices not in DEVICES:
        raise ConfigError(
            f"distribution.devices ({distribution.devices!r}) is not one of {', '.join(DEVICES)}"
        )
    if distribution.devices == "cpu" and name == "tpu":
        raise ConfigError("distribution.devices='cpu' contradicts distribution.strategy='tpu'")
    _check_multi_worker_fields(distribution)
    cpu_replicas = distribution.cpu_replicas
    if cpu_replicas < 0:
        raise ConfigError(
            f"distribution.cpu_replicas ({cpu_replicas}) must be >= 0; 0 leaves the CPU whole"
        )
    # Physical, not logical: listing logical devices starts the runtime, after which neither
    # logical CPUs nor collectives can be configured.
    gpus = tf.config.list_physical_devices("GPU")
    if distribution.devices == "cpu":
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        gpus = []
    else:
        configure_gpu_memory(gpus, distribution.gpu_memory)
        hardware = hardware or hardware_lib.probe()
        _refuse_silent_cpu_run(name, hardware, gpus)
        if name == "auto" and hardware.is_tpu_vm:
            return _tpu_strategy(distribution.tpu)
    if name == "multi_worker":  # Before any op runs: collectives must be set up first.
        return _multi_worker_strategy(distribution)
    configure_cpu_replicas(cpu_replicas)
    if name == "auto":
        if gpus:
            return tf.distribute.MirroredStrategy()
        if cpu_replicas > 1:
            return tf.distribute.MirroredStrategy(_cpu_device_names(cpu_replicas))
        return tf.distribute.get_strategy()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        devices = None if gpus else _cpu_device_names(max(cpu_replicas, 1))
        return tf.distribute.MirroredStrategy(devices)
    return _tpu_strategy(distribution.tpu)


def describe_devices(strategy: tf.distribute.Strategy) -> str:
    """The devices this process trains on, for the start-up summary, e.g. `2 x GPU (NVIDIA A100)`.

    Starts the runtime (it lists logical devices): call it after the strategy is built.
    """
    try:
        names = list(strategy.extended.worker_devices)
    except RuntimeError:  # The default strategy has none: TF's default device, GPU:0 or the CPU.
        gpus = tf.config.list_logical_devices("GPU")
        names = [gpus[0].name if gpus else tf.config.list_logical_devices("CPU")[0].name]
    kinds = sorted({tf.DeviceSpec.from_string(name).device_type for name in names})
    description = f"{len(names)} x {'+'.join(kinds)}"
    if kinds == ["GPU"]:
        gpu_names = {
            tf.config.experimental.get_device_details(gpu).get("device_name", "?")
            for gpu in tf.config.list_physical_devices("GPU")
        }
        description += f" ({', '.join(sorted(gpu_names))})"
    return description


def describe_all_reduce(strategy: tf.distribute.Strategy, all_reduce: str) -> str:
    """How gradients are all-reduced, for the start-up summary. `all_reduce` is the config's
    distribution.all_reduce (MultiWorkerMirroredStrategy only).

    MirroredStrategy is left to choose (no cross_device_ops passed): per TF's
    `choose_the_best`, NCCL when every device is a GPU, else a reduction through one device.
    """
    if strategy.num_replicas_in_sync == 1:
        return "none (1 replica)"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return f"collectives, {all_reduce}" + (" (TF picks)" if all_reduce == "auto" else "")
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "TPU interconnect"
    devices = {tf.DeviceSpec.from_string(d).device_type for d in strategy.extended.worker_devices}
    return "NCCL" if devices == {"GPU"} else "through one device"


# Batches each replica's device holds ahead of the step (TF's default, made explicit): the
# distributed iterator copies the next batch to every device while the current step runs. Each
# one is a per-replica batch of device memory.
DEVICE_PREFETCH_BATCHES = 1


def input_options() -> tf.distribute.InputOptions:
    """How the train and eval inputs reach the devices: fetched to each replica's device,
    `DEVICE_PREFETCH_BATCHES` ahead (host-side, data.py's pipelines prefetch with AUTOTUNE)."""
    return tf.distribute.InputOptions(
        experimental_fetch_to_device=True,
        experimental_per_replica_buffer_size=DEVICE_PREFETCH_BATCHES,
    )


def describe_input(strategy: tf.distribute.Strategy) -> str:
    """Where the input is prefetched, for the start-up summary.

    The default strategy has no distributed iterator: its batches stay on the host until the
    step copies them (on a GPU, a copy inside the step). Every other strategy prefetches.
    """
    try:
        devices = len(strategy.extended.worker_devices)
    except RuntimeError:  # The default strategy.
        return "prefetched on the host (autotune), copied to the device in the step"
    return (
        f"prefetched to {devices} device{'s' if devices > 1 else ''}, "
        f"{DEVICE_PREFETCH_BATCHES} batch{'es' if DEVICE_PREFETCH_BATCHES > 1 else ''} ahead "
        "(host: autotune)"
    )


def topology(strategy: tf.distribute.Strategy, strategy_name: str) -> Topology:
    """Reads replicas, workers and the chief flag off a built strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    num_workers = 1
    if task_type in ("chief", "worker"):  # Multi-worker; a TPU's single client is one worker.
        cluster = resolver.cluster_spec().as_dict()
        num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    return Topology(
        num_replicas=strategy.num_replicas_in_sync,
        num_workers=num_workers,
        worker_index=getattr(resolver, "task_id", None) or 0,
        # Only the chief writes checkpoints, metrics and the workdir lock.
        is_chief=strategy.extended.should_checkpoint,
        strategy_name=strategy_name,
    )

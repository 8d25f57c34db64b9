"""Builds the tf.distribute strategy named in the config and reports the topology it gives."""

import dataclasses
import json
import os

import ml_collections
import tensorflow as tf

from trainer.errors import ConfigError, UserError


class StrategyError(UserError):
    """The requested strategy cannot be built here; the message says what to change."""


STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")


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
            "a Cloud TPU VM, set --config.distribution.tpu=NAME, or use strategy=auto for CPU/GPU"
        ) from error
    return tf.distribute.TPUStrategy(resolver)


def _multi_worker_strategy() -> tf.distribute.Strategy:
    if "TF_CONFIG" not in os.environ:
        raise StrategyError(
            "distribution.strategy='multi_worker' needs the TF_CONFIG environment variable "
            "(cluster and task); launch/multi_worker_local.sh sets it for workers on one machine"
        )
    json.loads(os.environ["TF_CONFIG"])  # Fails early and clearly on malformed JSON.
    return tf.distribute.MultiWorkerMirroredStrategy()


def create_strategy(distribution: ml_collections.ConfigDict) -> tf.distribute.Strategy:
    """Returns the strategy named by `distribution.strategy` (see configs/default.py)."""
    name = distribution.strategy
    if name not in STRATEGIES:
        raise ConfigError(f"distribution.strategy ({name!r}) is not one of {', '.join(STRATEGIES)}")
    cpu_replicas = distribution.cpu_replicas
    if cpu_replicas < 0:
        raise ConfigError(
            f"distribution.cpu_replicas ({cpu_replicas}) must be >= 0; 0 leaves the CPU whole"
        )
    if name == "multi_worker":  # Before anything else: collectives must be set up first.
        return _multi_worker_strategy()
    configure_cpu_replicas(cpu_replicas)
    # Physical, not logical: listing logical devices starts the runtime, after which neither
    # logical CPUs nor collectives can be configured.
    gpus = tf.config.list_physical_devices("GPU")
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

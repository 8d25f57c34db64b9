"""Run set-up: the strategy, the data and the plan, resolved once before any variable exists."""

import dataclasses
import os

import ml_collections
import tensorflow as tf
from absl import logging

from trainer import (
    config_check,
    data,
    data_service,
    distribute,
    hardware,
    learning_rate,
    precision,
    preprocessing,
    sources,
)
from trainer import plan as plan_lib


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything resolved once at start-up; also where both input pipelines are built."""

    config: ml_collections.ConfigDict
    strategy: tf.distribute.Strategy
    topology: distribute.Topology
    precision: precision.Precision  # The dtype policy the model is built with.
    plan: plan_lib.Plan
    schedule: learning_rate.WarmupDecaySchedule  # The plan's base LR curve.
    train_split: sources.Split
    eval_split: sources.Split
    preprocessing: preprocessing.Preprocessing
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """What the model sees, after preprocessing."""
        return self.preprocessing.output_shape(self.train_split.image_shape)

    def train_iterator(self, start_position: int):
        """A distributed iterator over the endless train stream, `start_position` examples in;
        it yields micro-batches, `plan.accumulation_steps` per update."""
        dataset_fn = data.train_dataset_fn(
            self.train_split,
            global_batch_size=self.plan.global_batch_size,
            start_position=start_position,
            seed=self.config.seed,
            preprocessing=self.preprocessing,
            accumulation_steps=self.plan.accumulation_steps,
            service_address=self.config.dataset.service_address,
        )
        dataset = self.strategy.distribute_datasets_from_function(
            dataset_fn, distribute.input_options()
        )
        return iter(dataset)

    def eval_input(self) -> tuple[tf.distribute.DistributedDataset, int]:
        """The eval split once over, padded to whole batches, and its number of steps.

        Eval batches are micro-batches: accumulation is there because a larger batch does not fit
        in memory, and the eval metrics do not depend on the batch size.
        """
        dataset_fn, num_steps = data.eval_dataset_fn(
            self.eval_split,
            global_batch_size=self.plan.micro_batch_size,
            preprocessing=self.preprocessing,
        )
        dataset = self.strategy.distribute_datasets_from_function(
            dataset_fn, distribute.input_options()
        )
        return dataset, num_steps


def _set_determinism(config: ml_collections.ConfigDict) -> bool:
    deterministic = config.deterministic
    if deterministic is None:  # Default: on unless an accelerator is present.
        accelerators = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
        deterministic = not accelerators
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    return deterministic


def prepare(config: ml_collections.ConfigDict) -> Setup:
    """Builds the strategy, loads the data and resolves the plan; logs the plan once.

    Every user error surfaces here, before anything is written to the workdir.
    """
    # The strategy first: logical CPU devices must be set up before any TF op runs.
    host = hardware.probe()
    strategy = distribute.create_strategy(config.distribution, host)
    topology = distribute.topology(strategy, config.distribution.strategy)
    model_precision = precision.resolve(config.precision, strategy, host)
    config_check.check_config(config)
    deterministic = _set_determinism(config)
    image_preprocessing = preprocessing.from_config(config.dataset)
    train_split = sources.load_split(config.dataset, config.dataset.train_split)
    eval_split = sources.load_split(config.dataset, config.dataset.eval_split)
    service_address = config.dataset.service_address
    if service_address:
        data_service.check(service_address, train_split)
    plan = plan_lib.make_plan(
        config,
        num_replicas=topology.num_replicas,
        num_workers=topology.num_workers,
        train_examples=train_split.num_examples,
    )
    config_check.check_plan(config, plan)
    setup = Setup(
        config=config,
        strategy=strategy,
        topology=topology,
        precision=model_precision,
        plan=plan,
        schedule=learning_rate.base_schedule(plan, config.lr),
        train_split=train_split,
        eval_split=eval_split,
        preprocessing=image_preprocessing,
        num_classes=sources.num_classes(config.dataset),
    )
    # `input_shape` also fails here, before any file is written, if images need an image_size.
    logging.info(
        "%s | input: %s | deterministic: %s", plan.summary(), setup.input_shape, deterministic
    )
    devices = distribute.describe_devices(strategy)
    if "GPU" in devices:
        allocator = os.environ.get("TF_GPU_ALLOCATOR", "TF's default")
        devices += f" | gpu memory: {config.distribution.gpu_memory} | allocator: {allocator}"
    logging.info(
        "devices: %s | all-reduce: %s | input: %s | precision: %s (%s)",
        devices,
        distribute.describe_all_reduce(strategy, config.distribution.all_reduce),
        distribute.describe_input(strategy),
        model_precision.policy,
        model_precision.reason,
    )
    if service_address:
        logging.info(
            "train input: on the tf.data service at %s (the local pipeline's batches with one "
            "service worker; with more, each batch once but not in order)",
            service_address,
        )
    return setup

"""What a run is made of: the resolved set-up (strategy, data, plan) and the checkpointed state."""

import dataclasses
import json

import keras
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from trainer import (
    checkpointing,
    data,
    distribute,
    lr_control,
    models,
    optimizers,
    preprocessing,
    sources,
)
from trainer import plan as plan_lib


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything resolved once at start-up, before any variable exists."""

    strategy: tf.distribute.Strategy
    topology: distribute.Topology
    plan: plan_lib.Plan
    train_split: sources.InMemorySplit | sources.RecordSplit
    eval_split: sources.InMemorySplit | sources.RecordSplit
    preprocessing: preprocessing.Preprocessing
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """What the model sees, after preprocessing."""
        return self.preprocessing.output_shape(self.train_split.image_shape)


def _set_determinism(config: ml_collections.ConfigDict) -> bool:
    deterministic = config.deterministic
    if deterministic is None:  # Default: on unless an accelerator is present.
        accelerators = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
        deterministic = not accelerators
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    return deterministic


def prepare(config: ml_collections.ConfigDict) -> Setup:
    """Builds the strategy, loads the data and resolves the plan; logs the plan once."""
    # The strategy first: logical CPU devices must be set up before any TF op runs.
    strategy = distribute.create_strategy(config.distribution)
    topology = distribute.topology(strategy, config.distribution.strategy)
    plan_lib.check_config(config)
    deterministic = _set_determinism(config)
    image_preprocessing = preprocessing.from_config(config.dataset)
    train_split = sources.load_split(config.dataset, config.dataset.train_split)
    eval_split = sources.load_split(config.dataset, config.dataset.eval_split)
    plan = plan_lib.make_plan(
        config,
        num_replicas=topology.num_replicas,
        num_workers=topology.num_workers,
        train_examples=train_split.num_examples,
    )
    setup = Setup(
        strategy=strategy,
        topology=topology,
        plan=plan,
        train_split=train_split,
        eval_split=eval_split,
        preprocessing=image_preprocessing,
        num_classes=sources.num_classes(config.dataset),
    )
    # `input_shape` also fails here, before any file is written, if images need an image_size.
    logging.info(
        "%s | input: %s | deterministic: %s", plan.summary(), setup.input_shape, deterministic
    )
    return setup


@dataclasses.dataclass
class TrainState:
    """Everything a step depends on; all of it is in `checkpoint`."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    lr_state: lr_control.LRState
    schedule: lr_control.ControlledSchedule
    examples_seen: tf.Variable  # The input position: the stream resumes exactly here.
    nan_trigger: tf.Variable | None  # Test hook (config.inject_nan_at_step).
    checkpoint: tf.train.Checkpoint

    @property
    def step(self) -> int:
        """Optimizer updates applied so far (`.numpy()`: int() fails under a strategy)."""
        return int(self.optimizer.iterations.numpy())

    @property
    def plan_step(self) -> int:
        """Position on the plan's step axis; differs from `step` only after the global batch
        changed on resume (the schedule position is kept in examples)."""
        return self.step + int(self.lr_state.step_offset.numpy())


def build_state(
    config: ml_collections.ConfigDict,
    setup: Setup,
    base_schedule: keras.optimizers.schedules.LearningRateSchedule,
) -> TrainState:
    """Creates model, optimizer (owning `base_schedule` under LR control) and counters."""
    # Seeded here, right before the weights are drawn: preparing a dataset on first use consumes
    # global randomness, so seeding earlier made a first run start from other weights.
    keras.utils.set_random_seed(config.seed)
    with setup.strategy.scope():
        model = models.build_model(
            config.model, setup.input_shape, setup.num_classes, seed=config.seed
        )
        lr_state = lr_control.LRState(config.lr.plateau_mode)
        schedule = lr_control.ControlledSchedule(base_schedule, lr_state)
        optimizer = optimizers.build_optimizer(
            config.optimizer, schedule, model.trainable_variables
        )
        nan_trigger = None
        if config.inject_nan_at_step >= 0:
            nan_trigger = tf.Variable(config.inject_nan_at_step, dtype=tf.int64, trainable=False)
    examples_seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples_seen")
    checkpoint = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        lr_state=lr_state,
        examples_seen=examples_seen,
        rng=checkpointing.seed_generator_states(model),
    )
    return TrainState(model, optimizer, lr_state, schedule, examples_seen, nan_trigger, checkpoint)


def manifest(
    config: ml_collections.ConfigDict, plan: plan_lib.Plan, state: TrainState
) -> checkpointing.Manifest:
    """What the checkpoint of `state` is for; compared on resume."""
    return checkpointing.Manifest(
        step=state.step,
        examples_seen=int(state.examples_seen.numpy()),
        model=config.model.name,
        model_variables=[list(v.shape) for v in state.model.weights],
        optimizer=config.optimizer.name,
        plan=dataclasses.asdict(plan),
        config=json.loads(config.to_json_best_effort()),
        versions={
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tfds": tfds.__version__,
        },
    )


def train_iterator(config: ml_collections.ConfigDict, setup: Setup, state: TrainState):
    """A distributed iterator over the train stream, starting at the examples already seen."""
    dataset_fn = data.train_dataset_fn(
        setup.train_split,
        global_batch_size=setup.plan.global_batch_size,
        start_position=int(state.examples_seen.numpy()),
        seed=config.seed,
        preprocessing=setup.preprocessing,
    )
    return iter(setup.strategy.distribute_datasets_from_function(dataset_fn))

"""The checkpointed state of a run: model, optimizer (owning the LR), LR state, input position,
and the EMA of the weights when one is kept."""

import dataclasses
import json

import keras
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer import checkpointing, features, learning_rate, loop, models, optimizers, precision
from trainer.setup import Setup


@dataclasses.dataclass
class TrainState:
    """Everything a step depends on; all of it is in `checkpoint`."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: learning_rate.ControlledSchedule  # What the optimizer calls for every update's LR.
    examples_seen: tf.Variable  # The input position: the stream resumes exactly here.
    guard: loop.SpikeGuard  # The running loss/gradient-norm statistics a skip decision reads.
    ema: object | None  # The averaged weights (extras.ema.WeightEMA; ema_decay > 0), else None.
    lr_control: object | None  # extras.lr_control.ControllerState; None without that extra.
    loss_scale: precision.LossScale | None  # mixed_float16's dynamic loss scale, else None.
    checkpoint: tf.train.Checkpoint

    @property
    def lr_state(self) -> learning_rate.LRState:
        return self.schedule.state

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
    setup: Setup, base_schedule: keras.optimizers.schedules.LearningRateSchedule | None = None
) -> TrainState:
    """Creates model, optimizer and counters under the strategy, fresh (restore fills them in).

    The optimizer owns the LR: it is built with the plan's schedule (or `base_schedule`, e.g. the
    LR range test's sweep) under LR control.
    """
    config = setup.config
    # Seeded here, right before the weights are drawn: preparing a dataset on first use consumes
    # global randomness, so seeding earlier made a first run start from other weights.
    keras.utils.set_random_seed(config.seed)
    with setup.strategy.scope():
        with precision.policy_scope(setup.precision.policy):
            model = models.build_model(
                config.model, setup.input_shape, setup.num_classes, seed=config.seed
            )
        schedule = learning_rate.controlled_schedule(base_schedule or setup.schedule)
        # Whenever the extra exists, used or not: the checkpoint's shape stays the same when
        # milestones or reduce-on-plateau are turned on or off on resume.
        lr_control = features.load("lr_control")
        controller = lr_control.ControllerState(config.lr.plateau_mode) if lr_control else None
        optimizer = optimizers.build_optimizer(
            config.optimizer, schedule, model.trainable_variables
        )
        health = config.health
        guard = loop.SpikeGuard(
            window=health.window,
            sigma=health.sigma,
            min_history=health.min_history,
            skip=health.action == "skip",
        )
        ema_feature = features.if_asked("ema", config)
        ema = ema_feature.from_config(config.ema_decay, model) if ema_feature else None
        fp16 = setup.precision.policy == "mixed_float16"
        loss_scale = precision.LossScale() if fp16 else None
    examples_seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="examples_seen")
    checkpoint = tf.train.Checkpoint(
        model=model,
        optimizer=optimizer,
        lr_state=schedule.state,
        examples_seen=examples_seen,
        rng=checkpointing.seed_generator_states(model),
        health=guard,
        **({} if controller is None else {"lr_control": controller}),
        **({} if ema is None else {"ema": ema.checkpointed}),
        **({} if loss_scale is None else {"loss_scale": loss_scale}),
    )
    return TrainState(
        model, optimizer, schedule, examples_seen, guard, ema, controller, loss_scale, checkpoint
    )


def manifest(setup: Setup, state: TrainState) -> checkpointing.Manifest:
    """What the checkpoint of `state` is for; compared on resume."""
    config = setup.config
    return checkpointing.Manifest(
        step=state.step,
        examples_seen=int(state.examples_seen.numpy()),
        model=config.model.name,
        model_variables=[list(v.shape) for v in state.model.weights],
        optimizer=config.optimizer.name,
        plan=dataclasses.asdict(setup.plan),
        config=json.loads(config.to_json_best_effort()),
        input_shape=list(setup.input_shape),
        num_classes=setup.num_classes,
        weight_ema=state.ema is not None,
        versions={
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tfds": tfds.__version__,
        },
    )

"""Learning-rate range test (Smith 2015): sweep the LR up exponentially, watch the loss, suggest.

  python -m trainer.lr_find --config=configs/default.py --workdir=/tmp/tfscale

Runs the real model, data, strategy and compiled train step; writes only WORKDIR/lr_find/
(lr_find.json, lr_find.png) and never reads or writes the run's checkpoints.
"""

import dataclasses
import json
import math
import os
import time

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import flags, logging

from trainer import cli, learning_rate, loop
from trainer import setup as setup_lib
from trainer import state as state_lib
from trainer.errors import ConfigError

_MIN_LR = flags.DEFINE_float("min_lr", 1e-4, "First LR of the sweep.")
_MAX_LR = flags.DEFINE_float("max_lr", 10.0, "Last LR of the sweep.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 300, "Steps of the sweep.")


@keras.saving.register_keras_serializable(package="tfscale")
class ExponentialSweep(keras.optimizers.schedules.LearningRateSchedule):
    """LR of update u = min_lr x (max_lr / min_lr) ** ((u - 1) / (num_steps - 1))."""

    def __init__(self, min_lr: float, max_lr: float, num_steps: int):
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps

    def __call__(self, step):
        fraction = tf.cast(step, tf.float32) / float(max(self.num_steps - 1, 1))
        return self.min_lr * (self.max_lr / self.min_lr) ** fraction

    def get_config(self) -> dict:
        return {"min_lr": self.min_lr, "max_lr": self.max_lr, "num_steps": self.num_steps}


@dataclasses.dataclass(frozen=True)
class Result:
    learning_rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float | None  # For the run's real global batch (a peak LR); None: no decrease.
    suggested_base_lr: float | None  # Scaled back to lr.reference_batch_size (for lr.base).
    seconds: float


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: the raw per-batch loss is too noisy to read."""
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return smoothed


def suggest(learning_rates: list[float], smoothed: list[float]) -> float | None:
    """One tenth of the LR at the smoothed-loss minimum: the usual, conservative reading.

    None when the loss never fell by 5%: the minimum of a flat, noisy curve means nothing (a
    model that needs a few hundred steps to start learning, swept in too few steps).
    """
    best = int(np.argmin(smoothed))
    if smoothed[best] > 0.95 * smoothed[0]:
        return None
    return learning_rates[best] / 10


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    min_lr: float,
    max_lr: float,
    num_steps: int,
    divergence: float = 4.0,
) -> Result:
    """Sweeps the LR on the real set-up; stops early once the loss exceeds `divergence` x best."""
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"--min_lr ({min_lr}) and --max_lr ({max_lr}) need 0 < min_lr < max_lr")
    if num_steps < 2:
        raise ConfigError(f"--num_steps ({num_steps}) must be at least 2")
    started = time.monotonic()
    setup = setup_lib.prepare(config)
    state = state_lib.build_state(setup, ExponentialSweep(min_lr, max_lr, num_steps))
    train_loop = loop.make_train_loop(
        strategy=setup.strategy,
        model=state.model,
        optimizer=state.optimizer,
        global_batch_size=setup.plan.global_batch_size,
        accumulation_steps=setup.plan.accumulation_steps,
        grad_clip_norm=config.optimizer.grad_clip_norm,
    )
    iterator = setup.train_iterator(start_position=0)
    one_step = tf.constant(1)
    learning_rates, losses = [], []
    for _ in range(num_steps):
        # One step per call: the sweep needs every step's loss (a host sync each, fine here).
        outputs = train_loop(iterator, one_step)
        loss = float(outputs["loss"].numpy())
        learning_rates.append(float(outputs["learning_rate"].numpy()))
        losses.append(loss)
        if not math.isfinite(loss) or loss > divergence * min(losses):
            break
    finite = [x if math.isfinite(x) else float("inf") for x in losses]
    smoothed = smooth(finite)
    suggested = suggest(learning_rates, smoothed)
    plan = setup.plan
    scale = learning_rate.scale_learning_rate(
        1.0, plan.reference_batch_size, plan.global_batch_size, plan.lr_scaling
    )
    result = Result(
        learning_rates=learning_rates,
        losses=losses,
        smoothed=smoothed,
        suggested_lr=suggested,
        suggested_base_lr=None if suggested is None else suggested / scale,
        seconds=time.monotonic() - started,
    )
    if setup.topology.is_chief:
        _write(result, os.path.join(workdir, "lr_find"))
    return result


def _write(result: Result, directory: str) -> None:
    import matplotlib  # Kept local: training never needs matplotlib.

    matplotlib.use("Agg")
    from matplotlib import pyplot

    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(os.path.join(directory, "lr_find.json"), "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=1)
    figure, axes = pyplot.subplots(figsize=(7, 3.5))
    axes.plot(result.learning_rates, result.losses, alpha=0.3, label="loss")
    axes.plot(result.learning_rates, result.smoothed, label="smoothed")
    if result.suggested_lr is not None:
        axes.axvline(result.suggested_lr, color="red", linestyle="--", label="suggested")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (this global batch)")
    axes.set_ylabel("train loss")
    axes.legend()
    figure.tight_layout()
    with tf.io.gfile.GFile(os.path.join(directory, "lr_find.png"), "wb") as f:
        figure.savefig(f, format="png", dpi=100)
    pyplot.close(figure)


def main(argv: list[str]) -> None:
    del argv
    result = run(
        cli.CONFIG.value,
        cli.WORKDIR.value,
        min_lr=_MIN_LR.value,
        max_lr=_MAX_LR.value,
        num_steps=_NUM_STEPS.value,
    )
    written = os.path.join(cli.WORKDIR.value, "lr_find")
    if result.suggested_lr is None:
        logging.warning(
            "lr_find | steps: %d | seconds: %.1f | the loss never fell by 5%%: no suggestion; "
            "rerun with more --num_steps | wrote %s",
            len(result.losses),
            result.seconds,
            written,
        )
        return
    logging.info(
        "lr_find | steps: %d | seconds: %.1f | suggested lr: %.4g (this global batch) | "
        "suggested lr.base: %.4g | wrote %s",
        len(result.losses),
        result.seconds,
        result.suggested_lr,
        result.suggested_base_lr,
        written,
    )


if __name__ == "__main__":
    cli.run(main, "config", "workdir")

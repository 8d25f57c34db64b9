"""Learning-rate range test (Smith 2015): sweep the LR up exponentially, watch the loss, suggest.

  python -m trainer.lr_find --config=configs/default.py --workdir=/tmp/tfscale

Runs the real model, data, strategy and compiled train step; writes only WORKDIR/lr_find/
(lr_find.json, lr_find.png) and never reads or writes the run's checkpoints. The suggestion is
the peak LR `--rule` reads off the smoothed curve: by default a third of the LR at its minimum,
the rule that came closest to the best LR of grids of short runs on three set-ups
(docs/lr_selection.md; a tenth, the usual reading, was 2.6-5.8x too low there). Whether it
holds up on a given set-up is what `python -m trainer.lr_sweep` checks.
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

from trainer import cli, loop, plotting
from trainer import setup as setup_lib
from trainer import state as state_lib
from trainer.errors import ConfigError

MIN_LR = flags.DEFINE_float(
    "min_lr", 1e-5, "First LR of the sweep (the range docs/lr_selection.md validated the rules on)."
)
MAX_LR = flags.DEFINE_float("max_lr", 10.0, "Last LR of the sweep.")
NUM_STEPS = flags.DEFINE_integer("num_steps", 300, "Steps of the sweep.")


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
    rule: str  # Which of RULES made the suggestion.
    suggested_lr: float | None  # For the run's real global batch (a peak LR); None: no decrease.
    suggested_base_lr: float | None  # Scaled back to lr.reference_batch_size (for lr.base).
    suggestions: dict[str, float | None]  # What every rule of RULES reads off (peak LRs).
    lr_scale: float  # Peak LR per unit of lr.base at this global batch (Plan.lr_scale).
    seconds: float


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average: the raw per-batch loss is too noisy to read."""
    average, smoothed = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**i))
    return smoothed


def _minimum(curve: np.ndarray) -> int:
    return int(np.argmin(curve))


def _steepest(curve: np.ndarray) -> int:
    """Where the smoothed loss falls fastest per unit of log LR (fastai's `steep`): the LRs are
    log-spaced, so the drop per step is the drop per log LR."""
    return int(np.argmin(np.diff(curve))) if len(curve) > 1 else 0


def _valley(curve: np.ndarray) -> int:
    """Half way into the longest valley (fastai's `valley`, by its published definition): the
    longest decreasing subsequence of the smoothed loss, which noise cannot break up, taken as
    the stretch of its length that ends where it ends."""
    longest = np.ones(len(curve), dtype=int)  # Longest decreasing subsequence ending at i.
    for i in range(1, len(curve)):
        earlier = longest[:i][curve[:i] > curve[i]]
        if len(earlier):
            longest[i] = earlier.max() + 1
    end = int(np.argmax(longest))
    start = end - int(longest[end])
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


# Candidate rules: the index on the sweep's curve, and the factor its LR is divided by. Compared
# against grids of short training runs on three set-ups in docs/lr_selection.md; DEFAULT_RULE is
# the one that came closest there.
RULES = {
    "minimum/10": (_minimum, 10.0),  # The classic reading (fastai: an order of magnitude below).
    # Inspired by Smith 2017, 3.3 (a cycle's low bound at 1/3-1/4 of the largest LR that
    # converges); here a third of the minimum's LR is the peak.
    "minimum/3": (_minimum, 3.0),
    "steepest": (_steepest, 1.0),
    "valley": (_valley, 1.0),
}
DEFAULT_RULE = "minimum/3"
RULE = flags.DEFINE_enum("rule", DEFAULT_RULE, list(RULES), "How the suggestion is read off.")
# What the rules leave out, as fastai's lr_find does: the first tenth of the sweep (the smoothing
# still warming up, steps whose loss barely depends on the LR) and the last 5 steps (divergence).
TRIM_START_FRACTION, TRIM_END = 0.1, 5


def suggest(
    learning_rates: list[float], smoothed: list[float], rule: str = DEFAULT_RULE
) -> float | None:
    """The LR `rule` (a key of RULES) reads off the sweep's smoothed loss curve, trimmed.

    None when the loss never fell by 5%: the minimum of a flat, noisy curve means nothing (a
    model that needs a few hundred steps to start learning, swept in too few steps).
    """
    curve = np.asarray(smoothed, dtype=float)
    if curve[_minimum(curve)] > 0.95 * curve[0]:
        return None
    first = int(TRIM_START_FRACTION * len(curve))
    trimmed = curve[first : max(len(curve) - TRIM_END, first + 1)]
    index, divisor = RULES[rule]
    return learning_rates[first + index(trimmed)] / divisor


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    min_lr: float = MIN_LR.default,
    max_lr: float = MAX_LR.default,
    num_steps: int = NUM_STEPS.default,
    rule: str = DEFAULT_RULE,
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
    suggestions = {name: suggest(learning_rates, smoothed, name) for name in RULES}
    suggested = suggestions[rule]
    scale = setup.plan.lr_scale
    result = Result(
        learning_rates=learning_rates,
        losses=losses,
        smoothed=smoothed,
        rule=rule,
        suggested_lr=suggested,
        suggested_base_lr=None if suggested is None else suggested / scale,
        suggestions=suggestions,
        lr_scale=scale,
        seconds=time.monotonic() - started,
    )
    if setup.topology.is_chief:
        _write(result, os.path.join(workdir, "lr_find"))
    return result


def _write(result: Result, directory: str) -> None:
    tf.io.gfile.makedirs(directory)
    with tf.io.gfile.GFile(os.path.join(directory, "lr_find.json"), "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=1)
    with plotting.png(os.path.join(directory, "lr_find.png")) as axes:
        axes.plot(result.learning_rates, result.losses, alpha=0.3, label="loss")
        axes.plot(result.learning_rates, result.smoothed, label="smoothed")
        if result.suggested_lr is not None:
            axes.axvline(
                result.suggested_lr, color="red", linestyle="--", label=f"suggested ({result.rule})"
            )
        axes.set_xscale("log")
        axes.set_xlabel("learning rate (this global batch)")
        axes.set_ylabel("train loss")
        axes.legend()


def main(argv: list[str]) -> None:
    del argv
    result = run(
        cli.CONFIG.value,
        cli.WORKDIR.value,
        min_lr=MIN_LR.value,
        max_lr=MAX_LR.value,
        num_steps=NUM_STEPS.value,
        rule=RULE.value,
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

"""An exponential moving average (EMA) of the trainable weights, kept in-graph and checkpointed.

After every *applied* update (a skipped one, `health.action=skip`, leaves it alone) each average
moves towards its weight, inside the compiled train step, with no host sync:

  average <- average - (1 - d_n) * (average - weight),   d_n = min(ema_decay, (1 + n) / (10 + n))

where n counts the EMA updates before this one (0 for the first). The warm-up of the decay is
TF's `tf.train.ExponentialMovingAverage(decay, num_updates=n)`: early averages are not dominated
by the random initial weights (without it, 0.9999 would need ~10^4 updates to forget them), and
from n = 9 / (1 - ema_decay) - 10 on, the decay is `ema_decay` itself. n is the averages' own
counter, not the optimizer step, so skipped updates and a fine-tuning start do not count.

Only trainable weights are averaged. BatchNorm's moving mean and variance are already running
averages (of batch statistics, with `model.bn_momentum`); eval and export on the averages use
the raw model's moving statistics as they are (as Keras's own `use_ema` does). They were
gathered under the
raw weights, which the EMA trails: a small mismatch, which a BatchNorm re-estimation pass over
training data would remove (not done here; see BUILD_NOTES).

The averages are variables created under the strategy's scope (one copy per replica, each updated
from that replica's own copy of the weight by `strategy.extended.update`, so no cross-device
traffic) and part of the checkpoint, so a resumed run continues them bit for bit.
"""

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from trainer.errors import ConfigError


def check_config(ema_decay: float) -> None:
    """Raises ConfigError unless 0 <= ema_decay < 1."""
    if not 0 <= ema_decay < 1:
        raise ConfigError(
            f"ema_decay ({ema_decay}) must be in [0, 1): 0 = no EMA of the weights, typical "
            "values 0.999 or 0.9999 (averages over ~1/(1 - ema_decay) updates)"
        )


def _move_towards(average: tf.Variable, weight: tf.Tensor, decay: tf.Tensor):
    return average.assign_sub((average - weight) * (1.0 - decay))


def _exchange(weight: tf.Variable, average: tf.Variable):
    held = tf.identity(weight)
    weight.assign(average)
    return average.assign(held)


def _copy(average: tf.Variable, weight: tf.Tensor):
    return average.assign(weight)


class WeightEMA:
    """The averages of `model`'s trainable weights. Build it under the strategy's scope.

    `checkpointed` is what goes in the run's `tf.train.Checkpoint` (the averages and their update
    count; the weights themselves are saved with the model).
    """

    def __init__(self, model: keras.Model, decay: float):
        check_config(decay)
        self.decay = decay
        # The tf.Variables behind Keras's variables (distributed ones under a strategy).
        self._weights = [w.value for w in model.trainable_variables]
        self._strategy = tf.distribute.get_strategy()  # The scope it is built in.
        with tf.name_scope("ema"):
            self.averages = [
                tf.Variable(w.read_value(), trainable=False, name=w.name.split(":")[0])
                for w in self._weights
            ]
            self.num_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="updates")
        self.checkpointed = tf.train.Checkpoint(
            averages=self.averages, num_updates=self.num_updates
        )

    def _each(self, fn, variables, others, *args) -> None:
        """`fn(variable, other, *args)` on every replica's copies (cross-replica context)."""
        for variable, other in zip(variables, others, strict=True):
            self._strategy.extended.update(variable, fn, args=(other, *args))

    def current_decay(self) -> tf.Tensor:
        """d_n of the next update (see the module doc)."""
        n = tf.cast(self.num_updates, tf.float32)
        return tf.minimum(tf.constant(self.decay, tf.float32), (1.0 + n) / (10.0 + n))

    def update(self) -> None:
        """Moves every average towards its weight; call right after an applied update."""
        self._each(_move_towards, self.averages, self._weights, self.current_decay())
        self.num_updates.assign_add(1)

    def reset(self) -> None:
        """Averages = the current weights, no updates counted (a fine-tuning run's start)."""
        self._each(_copy, self.averages, self._weights)
        self.num_updates.assign(0)

    def swap(self) -> None:
        """Exchanges weights and averages, exactly (twice = as before)."""
        self._each(_exchange, self._weights, self.averages)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averages inside the block, its own weights again after it."""
        self.swap()
        try:
            yield
        finally:
            self.swap()


def from_config(ema_decay: float, model: keras.Model) -> WeightEMA | None:
    """The EMA of `model`'s weights, or None when `ema_decay` is 0 (off)."""
    return WeightEMA(model, ema_decay) if ema_decay else None

"""The task: the loss the model is trained on and the metrics it is scored by. A fork edits this.

Both functions see one batch on one replica, in replica context, inside the compiled step, and
return one float32 value per example; the loop does the averaging: over the global batch of each
update (train) and over the whole eval split, padding left out (eval). So a metric written here
is correct on any number of replicas and with gradient accumulation, with no all-reduce of its
own. Every module that names a metric (the log window, metrics.jsonl and TensorBoard tags, the
best keeper, reduce-on-plateau, the evaluator, lr_sweep) takes the names from `metrics`' keys:
train records use them as they are (`accuracy`), eval records with an `eval_` prefix
(`eval_accuracy`, and `eval_loss` for the loss), EMA evals with `ema_eval_`.

The loop looks both functions up at call time (`task.metrics(...)`), so a fork may also redefine
them at the end of this file. Example, a top-2 accuracy and label smoothing::

    def per_example_loss(labels, logits):
        logits = tf.cast(logits, tf.float32)
        targets = tf.one_hot(labels, tf.shape(logits)[-1])
        return keras.losses.categorical_crossentropy(
            targets, logits, from_logits=True, label_smoothing=0.1
        )

    _metrics = metrics

    def metrics(labels, logits):
        top2 = tf.math.in_top_k(tf.cast(labels, tf.int32), tf.cast(logits, tf.float32), 2)
        return {**_metrics(labels, logits), "top2_accuracy": tf.cast(top2, tf.float32)}
"""

import keras
import tensorflow as tf

from trainer.errors import ConfigError

# Metrics for which a lower value is better (the loss always is); every other metric is a score
# where higher is better. `best_mode` is checked against this.
LOWER_IS_BETTER: tuple[str, ...] = ()


def per_example_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Cross-entropy of each example, `[batch]` float32 whatever the model computes in."""
    logits = tf.cast(logits, tf.float32)
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def metrics(labels: tf.Tensor, logits: tf.Tensor) -> dict[str, tf.Tensor]:
    """Name -> `[batch]` float32 per-example values; the loop takes their means."""
    predicted = tf.argmax(logits, -1, output_type=labels.dtype)
    return {"accuracy": tf.cast(tf.equal(predicted, labels), tf.float32)}


# ---------------------------------------------------------------------------------------------
# Names derived from the two functions above; nothing below needs editing in a fork.

EVAL_PREFIX = "eval_"
# With an EMA of the weights (ema_decay > 0) eval also runs on the averages: the same metrics,
# with this prefix in front of the eval name (`ema_eval_accuracy`).
EMA_PREFIX = "ema_"
# Keys a train loop's outputs and a train record already use.
_RESERVED = ("loss", "learning_rate", "steps")


def metric_names(num_classes: int) -> tuple[str, ...]:
    """The keys `metrics` returns, found by calling it on a two-example batch (eager, cheap).

    Raises:
      ConfigError: a name clashes with a record field, or a value is not one per example.
    """
    labels = tf.zeros([2], tf.int32)
    values = metrics(labels, tf.zeros([2, num_classes], tf.float32))
    for name, value in values.items():
        if name in _RESERVED or not name.isidentifier():
            raise ConfigError(
                f"task.metrics returns {name!r}: a metric name must be an identifier other than "
                f"{', '.join(_RESERVED)}; rename it in trainer/task.py"
            )
        if value.shape != [2]:
            raise ConfigError(
                f"task.metrics[{name!r}] has shape {value.shape.as_list()} for a batch of 2; "
                "return one value per example (the loop averages them) in trainer/task.py"
            )
    return tuple(values)


def eval_metric_names(names: tuple[str, ...], with_ema: bool) -> tuple[str, ...]:
    """What an eval logs: the loss and each metric, and their EMA twins when an EMA is kept."""
    raw = (EVAL_PREFIX + "loss", *(EVAL_PREFIX + name for name in names))
    return raw + (tuple(EMA_PREFIX + name for name in raw) if with_ema else ())


def better(eval_name: str) -> str:
    """ "min" or "max": which direction of an eval metric (`eval_loss`, `ema_eval_x`) is better."""
    name = eval_name.removeprefix(EMA_PREFIX).removeprefix(EVAL_PREFIX)
    return "min" if name == "loss" or name in LOWER_IS_BETTER else "max"

"""The compiled inner loops: `num_steps` train steps, or one eval pass, per tf.function call.

Nothing in here syncs with the host: the Python side reads the returned scalars once per call.
`num_steps` is a tensor, so a shorter last loop does not retrace.
"""

from collections.abc import Callable

import keras
import tensorflow as tf

SUM = tf.distribute.ReduceOp.SUM
# What `eval_loop` returns, in order; `lr.plateau_metric` must be one (checked at start-up).
EVAL_METRICS = ("eval_loss", "eval_accuracy")


def _per_example_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def _clip_by_global_norm(grads: list[tf.Tensor], clip_norm: float) -> list[tf.Tensor]:
    """Clips the *all-reduced* gradient, then hands Keras 1/replicas of it to sum again.

    Keras 3 clips before it all-reduces (per-replica partial gradients: the wrong norm), so the
    optimizer's own clipnorm is not used. This costs one extra all-reduce, only when clipping.
    """
    context = tf.distribute.get_replica_context()
    summed = context.all_reduce(SUM, grads)
    clipped, _ = tf.clip_by_global_norm(summed, clip_norm)
    return [grad / context.num_replicas_in_sync for grad in clipped]


def make_train_loop(
    *,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    global_batch_size: int,
    grad_clip_norm: float = 0.0,
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `train_loop(iterator, num_steps)` -> mean loss/accuracy and the last applied LR."""

    def train_step(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            # Averaged over the *global* batch: replicas' gradients are summed by the all-reduce.
            loss = tf.nn.compute_average_loss(
                _per_example_loss(labels, logits), global_batch_size=global_batch_size
            )
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        if grad_clip_norm > 0:
            grads = _clip_by_global_norm(grads, grad_clip_norm)
        # Read from the optimizer just before it applies: exactly the LR of this update.
        learning_rate = tf.cast(optimizer.learning_rate, tf.float32)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
        )
        return loss, correct, learning_rate

    @tf.function
    def train_loop(iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        loss_sum = tf.constant(0.0)
        correct_sum = tf.constant(0.0)
        learning_rate = tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss, correct, per_replica_lr = strategy.run(train_step, args=next(iterator))
            loss_sum += strategy.reduce(SUM, loss, axis=None)
            correct_sum += strategy.reduce(SUM, correct, axis=None)
            learning_rate = strategy.experimental_local_results(per_replica_lr)[0]
        steps = tf.cast(num_steps, tf.float32)
        return {
            "loss": loss_sum / steps,
            "accuracy": correct_sum / (steps * global_batch_size),
            "learning_rate": learning_rate,
        }

    return train_loop


def make_eval_loop(
    *, strategy: tf.distribute.Strategy, model: keras.Model
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `eval_loop(iterator, num_steps)` -> weighted mean loss and accuracy."""

    def eval_step(
        images: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor
    ) -> tuple[tf.Tensor, ...]:
        logits = model(images, training=False)
        correct = tf.cast(
            tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32
        )
        return (
            tf.reduce_sum(_per_example_loss(labels, logits) * weights),
            tf.reduce_sum(correct * weights),
            tf.reduce_sum(weights),
        )

    @tf.function
    def eval_loop(iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        totals = [tf.constant(0.0)] * 3
        for _ in tf.range(num_steps):
            per_replica = strategy.run(eval_step, args=next(iterator))
            totals = [
                t + strategy.reduce(SUM, v, axis=None)
                for t, v in zip(totals, per_replica, strict=True)
            ]
        loss_sum, correct_sum, count = totals
        return dict(zip(EVAL_METRICS, (loss_sum / count, correct_sum / count), strict=True))

    return eval_loop

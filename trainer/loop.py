"""The compiled inner loops: `num_steps` train steps, or one eval pass, per tf.function call.

Nothing in here syncs with the host: the Python side reads the returned tensors once per call.
`num_steps` is a tensor, so a shorter last loop does not retrace. Besides the means, the train
loop returns every update's health signals as a `[num_steps, len(SIGNALS)]` matrix, filled in a
TensorArray sized by `num_steps` and read once, at the loop boundary.
"""

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from trainer import task
from trainer.errors import ConfigError, UserError
from trainer.precision import LossScale

if TYPE_CHECKING:  # An opt-in feature: the loop only calls the object it is given.
    from trainer.extras.ema import WeightEMA

SUM = tf.distribute.ReduceOp.SUM


# The columns of the per-update `steps` matrix `train_loop` returns, all global (the same on
# every replica): the loss over the global batch; the L2 norm of the all-reduced gradient (before
# clipping); the L2 norm of the weights before the update; the L2 norm of the change the update
# made to the weights (measured: new minus old weights); the LR the optimizer applied; 1 if the
# update was skipped (health.action=skip), else 0.
SIGNALS = ("loss", "grad_norm", "param_norm", "update_norm", "learning_rate", "skipped")


class SpikeGuard(tf.Module):
    """In-graph running statistics of the loss and gradient norm; drops spiking updates if asked.

    The in-graph twin of `health.spike_flags` (same rule, same numbers): an update is a spike if
    the log of its loss or gradient norm exceeds mean + sigma x std of the logs of the last
    `window` finite values, once `min_history` of them exist (Levanter's and OLMo-core's
    skip-step rule, 128 / 6 / 64 by default, on the log scale). With `skip`, such an update and
    any non-finite one are dropped without a host sync: the update runs under a `tf.cond` on
    that decision, in cross-replica context (a cond inside the replica function cannot contain
    Keras's all-reduce), decided from all-reduced values so every replica takes the same branch.
    A skipped update leaves weights and optimizer slots untouched but does advance
    `optimizer.iterations`, so the schedule, the step and the input position stay in lock step
    (the skipped batch counts as consumed).

    The statistics are variables (create under `strategy.scope()`) and part of the checkpoint,
    so a resumed run decides exactly as an uninterrupted one would. They are kept in every mode,
    so switching `health.action` to skip on resume starts from warm statistics.
    """

    def __init__(self, *, window: int, sigma: float, min_history: int, skip: bool):
        super().__init__(name="spike_guard")
        self.window, self.sigma, self.min_history, self.skip = window, sigma, min_history, skip
        # Logs of the last `window` finite positive losses and gradient norms (a ring buffer).
        self.losses = tf.Variable(tf.zeros([window]), trainable=False, name="losses")
        self.grad_norms = tf.Variable(tf.zeros([window]), trainable=False, name="grad_norms")
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")

    def _exceeds(self, history: tf.Variable, value: tf.Tensor) -> tf.Tensor:
        valid = tf.range(self.window, dtype=tf.int64) < self.count
        n = tf.maximum(tf.reduce_sum(tf.cast(valid, tf.float32)), 1.0)
        mean = tf.reduce_sum(tf.where(valid, history, 0.0)) / n
        variance = tf.reduce_sum(tf.where(valid, tf.square(history - mean), 0.0)) / n
        return value > mean + self.sigma * tf.maximum(tf.sqrt(variance), 1e-6)

    def observe(self, loss: tf.Tensor, grad_norm: tf.Tensor) -> tf.Tensor:
        """Whether to apply this update (always, unless `skip`); records it in the statistics."""
        usable = tf.logical_and(
            tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(grad_norm)),
            tf.logical_and(loss > 0, grad_norm > 0),
        )
        log_loss = tf.math.log(tf.where(usable, loss, 1.0))
        log_grad_norm = tf.math.log(tf.where(usable, grad_norm, 1.0))
        spike = tf.logical_and(
            self.count >= self.min_history,
            tf.logical_or(
                self._exceeds(self.losses, log_loss),
                self._exceeds(self.grad_norms, log_grad_norm),
            ),
        )
        finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(grad_norm))
        keep = tf.logical_and(finite, tf.logical_not(spike)) if self.skip else tf.constant(True)
        # Spikes enter the window too (as in Levanter and OLMo-core); non-finite values never.
        index = [[self.count % self.window]]
        for history, value in ((self.losses, log_loss), (self.grad_norms, log_grad_norm)):
            updated = tf.tensor_scatter_nd_update(history, index, [value])
            history.assign(tf.where(usable, updated, history))
        self.count.assign_add(tf.cast(usable, tf.int64))
        self.skipped.assign_add(tf.cast(tf.logical_not(keep), tf.int64))
        return keep


def _hand_reduced_gradients_to(optimizer: keras.optimizers.Optimizer) -> None:
    """Makes `optimizer.apply_gradients` take gradients that are already all-reduced.

    The loop all-reduces each update's gradient itself, because the health signals and clipping
    need the global gradient before the update. Keras 3's TF optimizer all-reduces again inside
    `apply_gradients` (in replica context, with no public way to hand it a reduced gradient):
    a second all-reduce of the whole gradient on every update, 5% of the throughput on two
    replicas (benchmarks/health_overhead.py). Replacing its `_all_reduce_sum_gradients` on this
    instance by the identity removes it; only the loop may call this optimizer's
    `apply_gradients` afterwards. The hook is private, so the Keras range in pyproject.toml is
    narrow, and a Keras without it (an install that ignored that range) is refused here, in one
    line, rather than silently reducing twice.
    """
    if not callable(getattr(optimizer, "_all_reduce_sum_gradients", None)):
        raise UserError(
            f"Keras {keras.__version__}'s optimizer has no _all_reduce_sum_gradients: install "
            "the Keras version pyproject.toml names (pip install -e .)"
        )
    optimizer._all_reduce_sum_gradients = list


def make_train_loop(
    *,
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    global_batch_size: int,
    accumulation_steps: int = 1,
    grad_clip_norm: float = 0.0,
    guard: SpikeGuard | None = None,
    jit_compile: bool = False,
    ema: "WeightEMA | None" = None,
    loss_scale: LossScale | None = None,
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `train_loop(iterator, num_steps)` -> the mean loss, the mean of each `task.metrics`
    over the loop's examples, the last applied LR and `steps`, the `[num_steps, len(SIGNALS)]`
    per-update signals.

    `global_batch_size` is the examples of one optimizer update. With `accumulation_steps` k > 1
    the iterator yields micro-batches (`data.train_dataset_fn` with the same k): each update
    reads k of them, sums their gradients on each replica (no communication), then all-reduces
    once, so it equals one update on the whole global batch up to float rounding. BatchNorm
    normalizes with micro-batch statistics and updates its moving averages k times per update.
    Without a `guard` (e.g. the LR range test) no statistics are kept and nothing is skipped.
    `jit_compile` XLA-compiles each replica's forward and backward pass. Not the all-reduce and
    the update: under MirroredStrategy TF cannot compile them (a compiled function around
    `strategy.run` reads variables across devices; `apply_gradients` inside one needs a
    cross-replica synchronization point), so they stay in the graph around it.
    With an `ema`, its averages move after every applied update (not after a skipped one).
    With a `loss_scale` (mixed_float16) the backward pass runs on the scaled loss and an update
    whose all-reduced gradient is not finite is skipped (see precision.LossScale).
    """
    variables = model.trainable_variables
    _hand_reduced_gradients_to(optimizer)
    metric_names = task.metric_names(model.output_shape[-1])

    @tf.function(jit_compile=jit_compile)
    def forward_backward(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, ...]:
        """One micro-batch on one replica: its share of the update's loss, its gradient."""
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            # Averaged over the *global* batch of the update: the all-reduce sums the replicas'
            # gradients and the accumulation the micro-batches', so the sum is the gradient of
            # the mean over all of it.
            loss = tf.nn.compute_average_loss(
                task.per_example_loss(labels, logits), global_batch_size=global_batch_size
            )
            if model.losses:  # Once per update in all: 1/replicas here, 1/k per micro-batch.
                regularization = tf.nn.scale_regularization_loss(tf.add_n(model.losses))
                loss += regularization / accumulation_steps
            scaled_loss = loss if loss_scale is None else loss * loss_scale.scale
        # Sums over this micro-batch; the loop divides by the examples it saw.
        metric_sums = {k: tf.reduce_sum(v) for k, v in task.metrics(labels, logits).items()}
        grads = tape.gradient(scaled_loss, variables)
        if loss_scale is not None:
            grads = [grad / loss_scale.scale for grad in grads]
        return loss, metric_sums, grads

    def add(total: tuple, part: tuple) -> tuple:
        return tf.nest.map_structure(tf.add, total, part)

    def earlier_sums(iterator) -> tuple:
        """(loss, metric sums, gradients) summed over all but the last micro-batch, per replica."""
        sums = strategy.run(forward_backward, args=next(iterator))
        for _ in tf.range(accumulation_steps - 2):
            sums = strategy.run(
                add, args=(sums, strategy.run(forward_backward, args=next(iterator)))
            )
        return sums

    def last_micro_batch(images: tf.Tensor, labels: tf.Tensor, earlier: tuple | None) -> tuple:
        """The last micro-batch on one replica plus the `earlier` sums, then the update's one
        all-reduce: the global gradient norm and the gradients to hand to the optimizer.

        The all-reduce stays in the replica function that computed the gradient:
        MirroredStrategy on one device fails ("destinations can not be empty") on tensors made
        in cross-replica context.
        """
        loss, metric_sums, grads = forward_backward(images, labels)
        if earlier is not None:
            loss, metric_sums, grads = add(earlier, (loss, metric_sums, grads))
        # The update's only all-reduce; the optimizer gets its result as is (see
        # `_hand_reduced_gradients_to`). The norm is of the all-reduced gradient, the global one
        # (per-replica partial gradients have another norm). Clipping uses it too: Keras 3 would
        # clip before its all-reduce (the wrong norm), so its own clipnorm is not used.
        summed = tf.distribute.get_replica_context().all_reduce(SUM, grads)
        grad_norm = tf.linalg.global_norm(summed)
        if grad_clip_norm > 0:
            summed, _ = tf.clip_by_global_norm(summed, grad_clip_norm, use_norm=grad_norm)
        return loss, metric_sums, grad_norm, summed

    def apply(grads: list[tf.Tensor]) -> None:
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    def train_step(iterator) -> tuple[tf.Tensor, tf.Tensor]:
        """One update, in cross-replica context; returns its SIGNALS row and metric sums."""
        before = [tf.identity(v) for v in variables]  # Kept by copy-on-write: one weight copy.
        # Decided in Python: without accumulation the graph has no accumulation loop.
        earlier = earlier_sums(iterator) if accumulation_steps > 1 else None
        images, labels = next(iterator)
        loss, metric_sums, grad_norm, grads = strategy.run(
            last_micro_batch, args=(images, labels, earlier)
        )
        loss = strategy.reduce(SUM, loss, axis=None)
        grad_norm = strategy.experimental_local_results(grad_norm)[0]  # Same on every replica.
        # Read from the optimizer just before it applies: exactly the LR of this update.
        learning_rate = tf.cast(optimizer.learning_rate, tf.float32)

        def apply_update() -> tf.Tensor:
            strategy.run(apply, args=(grads,))
            if ema is not None:  # Reads the new weights (ordered after the update by the graph).
                ema.update()
            return tf.constant(1.0)

        def skip_update() -> tf.Tensor:
            optimizer.iterations.assign_add(1)  # Nothing else moves (see SpikeGuard).
            return tf.constant(0.0)

        keep = tf.constant(True)
        if guard is not None:
            keep = guard.observe(loss, grad_norm)
        if loss_scale is not None:  # Judged on the all-reduced gradient: the same everywhere.
            finite = tf.math.is_finite(grad_norm)
            keep = tf.logical_and(keep, finite)
        if (guard is not None and guard.skip) or loss_scale is not None:
            applied = tf.cond(keep, apply_update, skip_update)
        else:
            applied = apply_update()
        if loss_scale is not None:
            loss_scale.update(finite)
        after = [tf.identity(v) for v in variables]
        update_norm = tf.linalg.global_norm([a - b for a, b in zip(after, before, strict=True)])
        row = tf.stack(
            [
                loss,
                grad_norm,
                tf.linalg.global_norm(before),
                update_norm,
                learning_rate,
                1.0 - applied,
            ]
        )
        return row, {k: strategy.reduce(SUM, v, axis=None) for k, v in metric_sums.items()}

    @tf.function
    def train_loop(iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        rows = tf.TensorArray(tf.float32, size=num_steps, element_shape=[len(SIGNALS)])
        sums = {name: tf.constant(0.0) for name in metric_names}
        for i in tf.range(num_steps):
            row, metric_sums = train_step(iterator)
            rows = rows.write(i, row)
            sums = {name: sums[name] + metric_sums[name] for name in metric_names}
        steps = rows.stack()
        examples = tf.cast(num_steps, tf.float32) * global_batch_size
        return {
            "loss": tf.reduce_mean(steps[:, 0]),
            **{name: total / examples for name, total in sums.items()},
            "learning_rate": steps[-1, SIGNALS.index("learning_rate")],
            "steps": steps,
        }

    return train_loop


_NO_XLA_KERNEL = re.compile(r"No registered '(\w+)' OpKernel for (XLA_\w+?)_JIT")
_NOT_DETERMINISTIC = re.compile(r"([^\n]*do not yet have a deterministic XLA implementation)")


def xla_error(error: tf.errors.OpError) -> ConfigError | None:
    """The config error for a train loop that failed because `jit_compile` could not compile the
    forward/backward pass (TF reports it when the loop first runs), or None for other errors.

    Seen on CPU: the default small_cnn under op determinism (`deterministic`, on by default
    without GPU/TPU): XLA has no deterministic MaxPool gradient; an op without an XLA kernel.
    """
    if "tf2xla conversion failed" not in error.message:
        return None
    prefix = "jit_compile (True): XLA cannot compile the model's forward/backward pass"
    if match := _NOT_DETERMINISTIC.search(error.message):
        return ConfigError(
            f"{prefix} with op determinism on (deterministic, on by default without a GPU or "
            f"TPU): {match.group(1).strip().rstrip('.')}; set --config.deterministic=False (runs "
            "are then not bitwise reproducible) or --config.jit_compile=False"
        )
    if match := _NO_XLA_KERNEL.search(error.message):
        return ConfigError(
            f"{prefix}: its op {match.group(1)} has no XLA kernel on {match.group(2)}; set "
            "--config.jit_compile=False, or replace that op in the model"
        )
    lines = [line for line in error.message.splitlines() if line.strip()]
    reason = next((line for line in lines if "error" not in line.lower()), lines[0])
    return ConfigError(f"{prefix}: {reason.strip()}; set --config.jit_compile=False")


def make_eval_loop(
    *, strategy: tf.distribute.Strategy, model: keras.Model
) -> Callable[[object, tf.Tensor], dict[str, tf.Tensor]]:
    """Returns `eval_loop(iterator, num_steps)` -> `eval_loss` and `eval_<metric>` for each
    `task.metrics`: means over the examples, the padding of the last batch left out."""

    def eval_step(images: tf.Tensor, labels: tf.Tensor, weights: tf.Tensor) -> dict:
        logits = model(images, training=False)
        values = {"loss": task.per_example_loss(labels, logits), **task.metrics(labels, logits)}
        sums = {name: tf.reduce_sum(value * weights) for name, value in values.items()}
        return {**sums, "count": tf.reduce_sum(weights)}

    @tf.function
    def eval_loop(iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        totals = None
        for _ in tf.range(num_steps):
            per_replica = strategy.run(eval_step, args=next(iterator))
            sums = {k: strategy.reduce(SUM, v, axis=None) for k, v in per_replica.items()}
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
        count = totals.pop("count")
        return {task.EVAL_PREFIX + name: total / count for name, total in totals.items()}

    return eval_loop


def evaluate(
    eval_loop: Callable[[object, tf.Tensor], dict[str, tf.Tensor]],
    dataset: tf.distribute.DistributedDataset,
    num_steps: int,
    ema: "WeightEMA | None" = None,
) -> dict[str, float]:
    """One eval pass over `dataset`; with an `ema`, a second pass on the averaged weights.

    Returns `task.eval_metric_names(..., with_ema=ema is not None)` as floats (a host sync). The
    EMA pass doubles the eval's cost; the raw weights are back, bit for bit, when it returns.
    """

    def one_pass() -> dict[str, float]:
        outputs = eval_loop(iter(dataset), tf.constant(num_steps))
        return {name: float(value.numpy()) for name, value in outputs.items()}

    metrics = one_pass()
    if ema is not None:
        with ema.applied():
            averaged = one_pass()
            metrics.update({task.EMA_PREFIX + name: value for name, value in averaged.items()})
    return metrics

"""What the per-update health signals cost: the trainer's compiled loop with and without them.

  python benchmarks/health_overhead.py --data_dir=DIR [--replicas=1] [--loops=8] [--repeats=5]

Both loops train the default config's model on its data with its optimizer and schedule. "with"
is `trainer.loop.make_train_loop` as the trainer runs it (guard statistics updated every update,
signals in a TensorArray, the matrix read once per loop); "without" is the same loop as it was
before the health signals: mean loss, accuracy and the last applied LR only. Calls alternate
(A, B, A, B, ...) so drift on a shared machine hits both alike. Reported: the fastest and the
median time per inner loop of `steps_per_loop` updates, and the throughput ratios with / without
from both (on a busy machine other processes only ever add time, so the fastest sample is the
steadier estimate of a loop's own cost), and the ratio of CPU seconds per loop (the work done,
which load from other processes barely changes).
Run one process per replica count (`--replicas=2` mirrors over 2 logical CPUs).
"""

import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

_REPLICAS = flags.DEFINE_integer("replicas", 1, "Logical CPU replicas (1 = default strategy).")
_LOOPS = flags.DEFINE_integer("loops", 1, "Inner loops per timed sample.")
_REPEATS = flags.DEFINE_integer("repeats", 12, "Timed samples of each loop.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir for the embedded dataset.")


def _loop_without_signals(strategy, model, optimizer, global_batch_size):
    """trainer/loop.py's train loop before the health signals (its code at commit 52b0bc3)."""
    import tensorflow as tf

    from trainer import loop, task

    def train_step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.nn.compute_average_loss(
                task.per_example_loss(labels, logits), global_batch_size=global_batch_size
            )
        grads = tape.gradient(loss, model.trainable_variables)
        learning_rate = tf.cast(optimizer.learning_rate, tf.float32)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        correct = tf.reduce_sum(
            tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels), tf.float32)
        )
        return loss, correct, learning_rate

    @tf.function
    def train_loop(iterator, num_steps):
        loss_sum, correct_sum, learning_rate = tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(num_steps):
            loss, correct, per_replica_lr = strategy.run(train_step, args=next(iterator))
            loss_sum += strategy.reduce(loop.SUM, loss, axis=None)
            correct_sum += strategy.reduce(loop.SUM, correct, axis=None)
            learning_rate = strategy.experimental_local_results(per_replica_lr)[0]
        steps = tf.cast(num_steps, tf.float32)
        return {
            "loss": loss_sum / steps,
            "accuracy": correct_sum / (steps * global_batch_size),
            "learning_rate": learning_rate,
        }

    return train_loop


def main(argv):
    del argv
    import tensorflow as tf

    from configs import default
    from trainer import loop
    from trainer import setup as setup_lib
    from trainer import state as state_lib

    config = default.get_config()
    config.dataset.data_dir = _DATA_DIR.value
    config.deterministic = False  # As in loop_overhead.py: op determinism is the user's trade.
    config.precision = "float32"  # As measured before precision=auto existed; either is fair.
    if _REPLICAS.value > 1:
        config.distribution.strategy = "mirrored"
        config.distribution.cpu_replicas = _REPLICAS.value
    else:
        config.distribution.strategy = "default"
    setup = setup_lib.prepare(config)
    batch, num_steps = setup.plan.global_batch_size, tf.constant(config.steps_per_loop)
    loops = {}
    for name in ("without", "with"):  # Each with its own state and input, built the same way.
        state = state_lib.build_state(setup)
        if name == "with":
            train_loop = loop.make_train_loop(
                strategy=setup.strategy,
                model=state.model,
                optimizer=state.optimizer,
                global_batch_size=batch,
                guard=state.guard,
            )
        else:
            train_loop = _loop_without_signals(setup.strategy, state.model, state.optimizer, batch)
        iterator = setup.train_iterator(0)

        def call(train_loop=train_loop, iterator=iterator):
            outputs = train_loop(iterator, num_steps)
            return {k: v.numpy() for k, v in outputs.items()}  # The one host read per loop.

        call()  # Warm-up: tracing and the first input.
        loops[name] = call
    samples = {name: [] for name in loops}
    cpu = {name: [] for name in loops}
    for _ in range(_REPEATS.value):
        for name, call in loops.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(_LOOPS.value):
                call()
            samples[name].append((time.perf_counter() - start) / _LOOPS.value)
            cpu[name].append((time.process_time() - start_cpu) / _LOOPS.value)
    steps = config.steps_per_loop
    summary = {"replicas": _REPLICAS.value, "steps_per_loop": steps}
    for statistic in (min, statistics.median):
        seconds = {name: statistic(values) for name, values in samples.items()}
        key = statistic.__name__
        summary[f"{key}_without_steps_per_sec"] = round(steps / seconds["without"], 2)
        summary[f"{key}_with_steps_per_sec"] = round(steps / seconds["with"], 2)
        summary[f"{key}_ratio_with_over_without"] = round(seconds["without"] / seconds["with"], 4)
    # CPU seconds this process spent per loop (all its threads): the work each loop does,
    # which other processes on a shared machine barely change.
    cpu_seconds = {name: statistics.median(values) for name, values in cpu.items()}
    summary["cpu_seconds_per_loop"] = {k: round(v, 3) for k, v in cpu_seconds.items()}
    summary["cpu_ratio_with_over_without"] = round(cpu_seconds["without"] / cpu_seconds["with"], 4)
    summary["samples_seconds_per_loop"] = {
        name: [round(v, 3) for v in values] for name, values in samples.items()
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)

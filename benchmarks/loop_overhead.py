"""What the trainer's machinery costs: its compiled loop vs a minimal strategy.run loop.

  python benchmarks/loop_overhead.py [--replicas=1,2] [--steps=400] [--steps_per_loop=50]

Both loops train the same small CNN on the same step-indexed input with SGD momentum. The minimal
loop has a float LR, no LR read, no metric accumulation. The trainer loop is `trainer.loop` with
the `ControlledSchedule` (warmup + cosine x checkpointed multiplier). Then the whole
`train_and_evaluate` outer loop (logging, LR control, a checkpoint every 100 steps) is timed in a
fresh `python -m trainer.main` process against the 1-replica minimal loop. Each timing is the
median of `--repeats` runs after a warm-up call.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

_REPLICAS = flags.DEFINE_list("replicas", ["1", "2"], "Logical CPU replicas to measure.")
_STEPS = flags.DEFINE_integer("steps", 400, "Steps per timed repeat.")
_STEPS_PER_LOOP = flags.DEFINE_integer("steps_per_loop", 50, "Inner loop length.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir for the embedded dataset.")


def _minimal_loop(strategy, model, optimizer, global_batch_size):
    import keras
    import tensorflow as tf

    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.nn.compute_average_loss(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True),
                global_batch_size=global_batch_size,
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    @tf.function
    def run(iterator, num_steps):
        for _ in tf.range(num_steps):
            strategy.run(step, args=next(iterator))

    return run


def _time(fn, calls: int, repeats: int) -> float:
    fn()  # Warm-up: tracing and the first iterator fill.
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _measure(num_replicas: int, data_dir: str) -> dict:
    import keras
    import tensorflow as tf

    from configs import default
    from trainer import data, loop, models, sources
    from trainer import plan as plan_lib
    from trainer import state as state_lib

    config = default.get_config()
    config.dataset.data_dir = data_dir
    devices = [f"/cpu:{i}" for i in range(num_replicas)]
    strategy = (
        tf.distribute.MirroredStrategy(devices)
        if num_replicas > 1
        else tf.distribute.get_strategy()
    )
    split = sources.load_split(config.dataset, "train")
    batch = config.global_batch_size
    loops = _STEPS.value // _STEPS_PER_LOOP.value
    num_steps = tf.constant(_STEPS_PER_LOOP.value)

    def iterator():
        fn = data.train_dataset_fn(split, global_batch_size=batch, start_position=0, seed=0)
        return iter(strategy.distribute_datasets_from_function(fn))

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = models.build_model(config.model, split.images.shape[1:], 10, seed=0)
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        optimizer.build(model.trainable_variables)
    minimal = _minimal_loop(strategy, model, optimizer, batch)
    minimal_iterator = iterator()
    minimal_seconds = _time(lambda: minimal(minimal_iterator, num_steps), loops, _REPEATS.value)

    plan = plan_lib.make_plan(
        config, num_replicas=num_replicas, num_workers=1, train_examples=split.num_examples
    )
    setup = state_lib.Setup(
        strategy=strategy,
        topology=None,
        plan=plan,
        train_split=split,
        eval_split=split,
        preprocessing=data.IDENTITY,
        num_classes=10,
    )
    state = state_lib.build_state(config, setup, plan_lib.make_schedule(plan, config.lr))
    trainer_loop = loop.make_train_loop(
        strategy=strategy, model=state.model, optimizer=state.optimizer, global_batch_size=batch
    )
    trainer_iterator = iterator()

    def trainer_call():
        outputs = trainer_loop(trainer_iterator, num_steps)
        return float(outputs["loss"].numpy())  # The outer loop's one sync per inner loop.

    trainer_seconds = _time(trainer_call, loops, _REPEATS.value)
    steps = loops * _STEPS_PER_LOOP.value
    return {
        "replicas": num_replicas,
        "minimal_steps_per_sec": round(steps / minimal_seconds, 2),
        "trainer_loop_steps_per_sec": round(steps / trainer_seconds, 2),
        "trainer_loop_overhead_pct": round(100 * (trainer_seconds / minimal_seconds - 1), 2),
        "retraces": trainer_loop.experimental_get_tracing_count() - 1,
    }


def _loss_wall_times(logdir: str) -> dict[int, float]:
    """Wall time of each logged `loss` scalar, from the TensorBoard event files."""
    import tensorflow as tf

    times = {}
    for name in os.listdir(logdir):
        for record in tf.data.TFRecordDataset(os.path.join(logdir, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            if any(value.tag == "loss" for value in event.summary.value):
                times[event.step] = event.wall_time
    return times


def _measure_outer_loop(data_dir: str, minimal_steps_per_sec: float) -> dict:
    """The whole outer loop of `python -m trainer.main` between its first and last log.

    Run in a fresh process (this one carries the state of the loops measured above). Wall time
    from the first to the last logged step covers inner loops, logging, LR control and
    checkpoints every 100 steps; no eval in between (that is work, not overhead).
    """
    steps = 50 + _STEPS.value
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "trainer.main",
                "--config=configs/default.py",
                f"--workdir={workdir}",
                f"--config.dataset.data_dir={data_dir}",
                f"--config.total_steps={steps}",
                "--config.eval_every_steps=1000000",
                "--config.checkpoint_every_steps=100",
                # Op determinism was off for the loops above too: it is the user's trade.
                "--config.deterministic=False",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        times = _loss_wall_times(os.path.join(workdir, "tensorboard"))
        directory = os.path.join(workdir, "checkpoints")
        size = sum(
            os.path.getsize(os.path.join(directory, f))
            for f in os.listdir(directory)
            if f.startswith(f"ckpt-{steps}.")
        )
    first, last = min(times), max(times)
    steps_per_sec = (last - first) / (times[last] - times[first])
    return {
        "steps_measured": last - first,
        "checkpoints_in_between": (last - first) // 100,
        "train_main_steps_per_sec": round(steps_per_sec, 2),
        "overhead_vs_minimal_pct": round(100 * (minimal_steps_per_sec / steps_per_sec - 1), 2),
        "checkpoint_bytes_default_config": size,
    }


def main(argv):
    del argv
    from trainer import distribute

    distribute.configure_cpu_replicas(max(int(r) for r in _REPLICAS.value))
    data_dir = _DATA_DIR.value or tempfile.mkdtemp()
    results = [_measure(int(r), data_dir) for r in _REPLICAS.value]
    single = next(r for r in results if r["replicas"] == 1)
    results.append({"outer_loop": _measure_outer_loop(data_dir, single["minimal_steps_per_sec"])})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    app.run(main)

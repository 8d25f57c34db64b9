"""What the trainer's machinery costs: its compiled loop vs a minimal strategy.run loop.

  python benchmarks/loop_overhead.py [--replicas=1,2] [--steps=400] [--steps_per_loop=50] \
      [--repeats=3] [--data_dir=DIR]

Both loops train the same small CNN on the same step-indexed input with SGD momentum. The minimal
loop has a float LR, no LR read, no metric accumulation. The trainer loop is `trainer.loop` as
`train.py` builds it: the `ControlledSchedule` (warmup + cosine x checkpointed multiplier), loss
and accuracy accumulation, the per-update health signals (`SpikeGuard`), all read once per loop.
Then the whole `train_and_evaluate` outer loop (logging, LR control, a checkpoint every 100 steps)
is timed in a fresh `python -m trainer.main` process against the 1-replica minimal loop. Each
timing is the median of `--repeats` runs after a warm-up call.

The measurements take their sizes as arguments and the flags are defined only when this runs as a
script, so tests/benchmarks_test.py can import it into a test process (where other tools already
define flags such as --data_dir) and run it at toy size.
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


def _define_flags() -> None:
    flags.DEFINE_list("replicas", ["1", "2"], "Logical CPU replicas to measure.")
    flags.DEFINE_integer("steps", 400, "Steps per timed repeat.")
    flags.DEFINE_integer("steps_per_loop", 50, "Inner loop length.")
    flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir for the embedded dataset.")


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


def strategy_for(num_replicas: int):
    """The default strategy for 1 replica, else Mirrored over that many logical CPUs."""
    import tensorflow as tf

    if num_replicas == 1:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])


def measure_loops(strategy, config, *, steps: int, steps_per_loop: int, repeats: int) -> dict:
    """Steps/s of the minimal loop and of the trainer's loop on `strategy`, and its retraces.

    `config` gives the model, the data and the global batch (the script: the default config).
    """
    import keras
    import tensorflow as tf

    from trainer import data, distribute, learning_rate, loop, models, precision, sources
    from trainer import plan as plan_lib
    from trainer import setup as setup_lib
    from trainer import state as state_lib

    loops = steps // steps_per_loop
    if loops < 1:
        raise ValueError(f"steps ({steps}) must be at least steps_per_loop ({steps_per_loop})")
    num_replicas = strategy.num_replicas_in_sync
    split = sources.load_split(config.dataset, config.dataset.train_split)
    num_classes = sources.num_classes(config.dataset)
    batch = config.global_batch_size
    num_steps = tf.constant(steps_per_loop)

    def iterator():
        fn = data.train_dataset_fn(split, global_batch_size=batch, start_position=0, seed=0)
        return iter(strategy.distribute_datasets_from_function(fn))

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = models.build_model(config.model, split.image_shape, num_classes, seed=0)
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        optimizer.build(model.trainable_variables)
    minimal = _minimal_loop(strategy, model, optimizer, batch)
    minimal_iterator = iterator()
    minimal_seconds = _time(lambda: minimal(minimal_iterator, num_steps), loops, repeats)

    # The trainer's own set-up, as `setup.prepare` builds it, minus strategy creation (the
    # caller's) and the eval split (not used here).
    plan = plan_lib.make_plan(
        config, num_replicas=num_replicas, num_workers=1, train_examples=split.num_examples
    )
    setup = setup_lib.Setup(
        config=config,
        strategy=strategy,
        topology=distribute.topology(strategy, "default" if num_replicas == 1 else "mirrored"),
        precision=precision.Precision("float32", "as the minimal loop's model"),
        plan=plan,
        schedule=learning_rate.base_schedule(plan, config.lr),
        train_split=split,
        eval_split=split,
        preprocessing=data.IDENTITY,
        num_classes=num_classes,
    )
    state = state_lib.build_state(setup)
    trainer_loop = loop.make_train_loop(  # As train.py builds it.
        strategy=strategy,
        model=state.model,
        optimizer=state.optimizer,
        global_batch_size=batch,
        grad_clip_norm=config.optimizer.grad_clip_norm,
        guard=state.guard,
    )
    trainer_iterator = iterator()

    def trainer_call():
        outputs = trainer_loop(trainer_iterator, num_steps)
        return {k: v.numpy() for k, v in outputs.items()}  # As the outer loop's one host sync.

    trainer_seconds = _time(trainer_call, loops, repeats)
    timed_steps = loops * steps_per_loop
    return {
        "replicas": num_replicas,
        "minimal_steps_per_sec": round(timed_steps / minimal_seconds, 2),
        "trainer_loop_steps_per_sec": round(timed_steps / trainer_seconds, 2),
        "trainer_loop_overhead_pct": round(100 * (trainer_seconds / minimal_seconds - 1), 2),
        "retraces": trainer_loop.experimental_get_tracing_count() - 1,
        # What the trainer loop did, so a caller can check it really trained.
        "trainer_updates": int(state.optimizer.iterations.numpy()),
    }


def _loss_wall_times(logdir: str, every: int) -> dict[int, float]:
    """Wall time at which the train loss of every `every`-th step was written to TensorBoard.

    Read from the event files in `logdir` and its run subdirectories (train/). The loss may be
    a point per step (`metrics/loss`, written when its inner loop ends) or one per log (`loss`);
    either way the points at multiples of `every` are written when their inner loop ends.
    """
    import tensorflow as tf

    paths = [
        os.path.join(directory, name)
        for directory, _, names in os.walk(logdir)
        if os.path.basename(directory) != "eval"
        for name in names
        if name.startswith("events.out.tfevents.")
    ]
    times = {}
    for path in paths:
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags = [value.tag for value in event.summary.value]
            if event.step % every == 0 and any(t == "loss" or t.endswith("/loss") for t in tags):
                times[event.step] = event.wall_time
    return times


def measure_outer_loop(
    data_dir: str, *, steps: int, steps_per_loop: int, minimal_steps_per_sec: float
) -> dict:
    """The whole outer loop of `python -m trainer.main` between its first and last log.

    Run in a fresh process (this one carries the state of the loops measured above). Wall time
    from the first to the last logged step covers inner loops, logging, LR control and
    checkpoints every 100 steps; no eval in between (that is work, not overhead). One inner loop
    of `steps_per_loop` steps, logged at its end, is the warm-up; `steps` more are measured.
    """
    from configs import default

    total = steps_per_loop + steps
    # The default config's warmup, unless the run is shorter (toy sizes, as the tests run it).
    warmup = min(default.get_config().lr.warmup_steps, total - 1)
    with tempfile.TemporaryDirectory() as workdir:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainer.main",
                "--config=configs/default.py",
                f"--workdir={workdir}",
                f"--config.dataset.data_dir={data_dir}",
                # As the minimal loop's model: `auto` would be bfloat16 on AMX CPUs.
                "--config.precision=float32",
                f"--config.total_steps={total}",
                f"--config.steps_per_loop={steps_per_loop}",  # The default config's: 50.
                f"--config.log_every_steps={steps_per_loop}",  # The default config's: 50.
                f"--config.lr.warmup_steps={warmup}",
                "--config.eval_every_steps=1000000",
                "--config.checkpoint_every_steps=100",
                # Op determinism was off for the loops above too: it is the user's trade.
                "--config.deterministic=False",
            ],
            cwd=REPO,
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"trainer.main exited {result.returncode}:\n{result.stderr[-3000:]}")
        times = _loss_wall_times(os.path.join(workdir, "tensorboard"), every=steps_per_loop)
        directory = os.path.join(workdir, "checkpoints")
        size = sum(
            os.path.getsize(os.path.join(directory, f))
            for f in os.listdir(directory)
            if f.startswith(f"ckpt-{total}.")
        )
    if len(times) < 2:
        raise RuntimeError(f"found the train loss of steps {sorted(times)} in TensorBoard; need 2")
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
    from configs import default
    from trainer import distribute

    options = flags.FLAGS
    replicas = [int(r) for r in options.replicas]
    if 1 not in replicas or len([r for r in replicas if r > 1]) > 1:
        # Mirrored strategies of two sizes in one process collide on their collective keys
        # ("joining a group with size 4, but that group has size 2").
        raise app.UsageError(
            f"--replicas ({','.join(options.replicas)}) must be 1 and at most one larger count, "
            "e.g. --replicas=1,4; run once per count"
        )
    distribute.configure_cpu_replicas(max(replicas))
    data_dir = options.data_dir or tempfile.mkdtemp()
    config = default.get_config()
    config.dataset.data_dir = data_dir
    sizes = {
        "steps": options.steps,
        "steps_per_loop": options.steps_per_loop,
        "repeats": options.repeats,
    }
    results = [measure_loops(strategy_for(r), config, **sizes) for r in replicas]
    single = next(r for r in results if r["replicas"] == 1)
    outer = measure_outer_loop(
        data_dir,
        steps=options.steps,
        steps_per_loop=options.steps_per_loop,
        minimal_steps_per_sec=single["minimal_steps_per_sec"],
    )
    results.append({"outer_loop": outer})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    _define_flags()
    app.run(main)

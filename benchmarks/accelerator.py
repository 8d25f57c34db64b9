"""Training throughput by precision and XLA: tfscale's compiled loop next to Keras `fit`.

  python benchmarks/accelerator.py [--models=small_cnn,resnet50] [--image_size=64]
      [--precisions=float32,mixed_bfloat16] [--jit_compile=false,true] [--batch_size=128]
      [--steps=200] [--steps_per_loop=50] [--peak_tflops=T] [--smoke]

Synthetic data (one random batch, repeated: the input pipeline is not measured), the default
strategy on this host's first device (GPU if TensorFlow sees one), SGD with momentum. For each
model, precision and `jit_compile` it times the same number of updates through
`trainer.loop.make_train_loop` (what the trainer runs) and through `model.fit` with
`steps_per_execution=steps_per_loop`, after one warm-up call each, and prints images/sec, ms per
step and, with `--peak_tflops` (the device's peak at that precision), the model FLOPs
utilization: 3 x forward FLOPs (forward + backward) x images/sec / peak. `--smoke` runs a toy
size in seconds (tests/benchmarks_test.py); its numbers mean nothing.
"""

import itertools
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402


def _define_flags() -> None:
    flags.DEFINE_list("models", ["small_cnn", "resnet50"], "Model names (trainer/models.py).")
    flags.DEFINE_integer("image_size", 64, "Side of the synthetic images (ResNet-50's is 224).")
    flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras dtype policies.")
    flags.DEFINE_list("jit_compile", ["false", "true"], "XLA off/on.")
    flags.DEFINE_integer("batch_size", 128, "Global batch.")
    flags.DEFINE_integer("steps", 200, "Timed updates per measurement.")
    flags.DEFINE_integer("steps_per_loop", 50, "Updates per compiled call (both paths).")
    flags.DEFINE_float(
        "peak_tflops", 0.0, "The device's peak TFLOP/s at the precision; 0 = no MFU."
    )
    flags.DEFINE_bool("smoke", False, "Toy sizes, to check that it runs.")


def forward_flops(model, image_shape: tuple[int, ...]) -> float:
    """FLOPs of one image's forward pass, counted by TF's profiler on the traced graph."""
    import tensorflow as tf
    from tensorflow.python.framework import convert_to_constants
    from tensorflow.python.profiler import model_analyzer, option_builder

    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec((1, *image_shape), tf.float32))
    graph = convert_to_constants.convert_variables_to_constants_v2(concrete).graph
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(model_analyzer.profile(graph, options=options).total_float_ops)


def _build(model_name: str, policy: str, image_shape, num_classes: int):
    import keras

    from configs import default as default_config
    from trainer import models, precision

    config = default_config.get_config().model
    config.name = model_name
    keras.utils.set_random_seed(0)
    with precision.policy_scope(policy):
        model = models.build_model(config, image_shape, num_classes, seed=0)
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _synthetic(batch_size: int, image_shape, num_classes: int):
    import tensorflow as tf

    images = tf.random.stateless_uniform((batch_size, *image_shape), seed=(0, 0))
    labels = tf.random.stateless_uniform(
        (batch_size,), seed=(0, 1), maxval=num_classes, dtype=tf.int32
    )
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def measure(
    model_name: str,
    policy: str,
    jit_compile: bool,
    *,
    image_size: int,
    batch_size: int,
    steps: int,
    steps_per_loop: int,
    num_classes: int = 10,
) -> dict[str, float]:
    """Seconds per update through tfscale's loop and through `fit`, same model and data."""
    import keras
    import tensorflow as tf

    from trainer import loop

    if steps % steps_per_loop:
        raise ValueError(f"steps ({steps}) must be a multiple of steps_per_loop ({steps_per_loop})")
    image_shape = (image_size, image_size, 3)
    strategy = tf.distribute.get_strategy()
    model, optimizer = _build(model_name, policy, image_shape, num_classes)
    train_loop = loop.make_train_loop(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        global_batch_size=batch_size,
        jit_compile=jit_compile,
    )
    iterator = iter(_synthetic(batch_size, image_shape, num_classes))
    per_loop = tf.constant(steps_per_loop)
    train_loop(iterator, per_loop)["loss"].numpy()  # Warm-up: traces and compiles.
    start = time.perf_counter()
    for _ in range(steps // steps_per_loop):
        outputs = train_loop(iterator, per_loop)
    outputs["loss"].numpy()
    tfscale_seconds = (time.perf_counter() - start) / steps

    model, optimizer = _build(model_name, policy, image_shape, num_classes)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_loop,
    )
    data = _synthetic(batch_size, image_shape, num_classes)
    model.fit(data, steps_per_epoch=steps_per_loop, epochs=1, verbose=0)  # Warm-up.
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    fit_seconds = (time.perf_counter() - start) / steps
    return {
        "tfscale_seconds_per_step": tfscale_seconds,
        "fit_seconds_per_step": fit_seconds,
        "forward_flops_per_image": forward_flops(model, image_shape),
    }


def _row(model_name, policy, jit_compile, path, seconds, flops, batch_size, peak_tflops) -> str:
    images_per_sec = batch_size / seconds
    mfu = f"{3 * flops * images_per_sec / (peak_tflops * 1e12):.1%}" if peak_tflops else "-"
    return (
        f"| {model_name} | {policy} | {jit_compile} | {path} | {images_per_sec:,.0f} | "
        f"{seconds * 1e3:.1f} | {mfu} |"
    )


def main(argv: list[str]) -> None:
    del argv
    config = flags.FLAGS
    sizes = dict(
        image_size=config.image_size,
        batch_size=config.batch_size,
        steps=config.steps,
        steps_per_loop=config.steps_per_loop,
    )
    if config.smoke:
        sizes = dict(image_size=32, batch_size=8, steps=4, steps_per_loop=2)
    print("| model | precision | jit_compile | loop | images/sec | ms/step | MFU |")
    print("|---|---|---|---|---|---|---|")
    for model_name, policy, jit in itertools.product(
        config.models, config.precisions, config.jit_compile
    ):
        jit_compile = jit.lower() == "true"
        result = measure(model_name, policy, jit_compile, **sizes)
        for path in ("tfscale", "fit"):
            print(
                _row(
                    model_name,
                    policy,
                    jit_compile,
                    path,
                    result[f"{path}_seconds_per_step"],
                    result["forward_flops_per_image"],
                    sizes["batch_size"],
                    config.peak_tflops,
                ),
                flush=True,
            )


if __name__ == "__main__":
    _define_flags()
    app.run(main)

"""What reading by index costs: the trainer's ArrayRecord stream vs plain sequential TFRecord.

  python benchmarks/input_pipeline.py [--data_dir=DIR] [--batches=300] [--image_size=64]

Both pipelines decode the same PNG images of `tfscale_shapes_variable` (32 to 96 px a side), crop
them with `inception_crop` to `--image_size` and batch them, with the same parallelism. The
baseline is what a user would write without exact resume: `TFRecordDataset` over the shards,
`shuffle(10_000)`, `map`, `batch` (shuffle state is then lost on restart). The trainer's stream
fetches each replica batch by index through ArrayRecord and draws crops from stream positions.
A third line shows the in-memory fast path on the fixed-size `tfscale_shapes` for scale.
Reported: examples/s over `--batches` batches after 20 warm-up batches, median of `--repeats`.
"""

import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir; a temporary one when unset.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Timed batches per repeat.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Crop output side.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported).")


def _examples_per_second(dataset) -> float:
    samples = []
    iterator = iter(dataset)
    for _ in range(20):
        next(iterator)
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for _ in range(_BATCHES.value):
            next(iterator)
        samples.append(_BATCHES.value * _BATCH_SIZE.value / (time.perf_counter() - start))
    return statistics.median(samples)


def main(argv: list[str]) -> None:
    del argv
    import ml_collections
    import tensorflow as tf

    from trainer import data, preprocessing, sources
    from trainer.datasets import shapes

    data_dir = _DATA_DIR.value or tempfile.mkdtemp()
    crop = preprocessing.Preprocessing(_IMAGE_SIZE.value, "inception_crop", 0.875)
    batch = _BATCH_SIZE.value
    context = tf.distribute.InputContext()

    def config(name: str, directory: str) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({"name": name, "data_dir": directory})

    records = sources.load_split(config("tfscale_shapes_variable", data_dir), "train")
    indexed = data.train_dataset_fn(
        records, global_batch_size=batch, start_position=0, seed=0, preprocessing=crop
    )(context)

    tfrecord_dir = os.path.join(data_dir, "as_tfrecord")
    builder = shapes.TfscaleShapesVariable(data_dir=tfrecord_dir, file_format="tfrecord")
    if not builder.is_prepared():
        builder.download_and_prepare()
    files = tf.io.gfile.glob(f"{builder.data_dir}/*-train.tfrecord-*")

    def parse(serialized, position):
        image, label = records.decode(serialized)
        return crop.train_example(image, position, 0), label

    sequential = (
        tf.data.TFRecordDataset(files)
        .repeat()
        .shuffle(10_000, seed=0)
        .enumerate()
        .map(lambda position, serialized: parse(serialized, position), tf.data.AUTOTUNE)
        .batch(batch, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    in_memory = sources.load_split(config("tfscale_shapes", data_dir), "train")
    fast = data.train_dataset_fn(in_memory, global_batch_size=batch, start_position=0, seed=0)

    print(f"batch {batch}, crops to {_IMAGE_SIZE.value}px, {os.cpu_count()} CPUs")
    for name, dataset in (
        ("TFRecord sequential + shuffle buffer (no exact resume)", sequential),
        ("ArrayRecord by index, trainer stream (exact resume)", indexed),
        ("in memory, fixed 32x32, no crop (fast path)", fast(context)),
    ):
        print(f"{name}: {_examples_per_second(dataset):,.0f} examples/s")


if __name__ == "__main__":
    app.run(main)

"""Input pipelines whose position is a number: batch k is a pure function of (seed, examples seen).

Why step-indexed: TF 2.21 cannot checkpoint a distributed iterator, and `Dataset.skip` is linear in
the position. Here the train stream is an infinite sequence of example *positions*; position p
reads example `index_shuffle(p mod N, seed=[seed, p div N])` (a fresh permutation each epoch). A
run that resumes after E examples simply starts the stream at E: O(1), on any strategy, with any
global batch, with no repeated or skipped example. The cost: the split is held in memory.
"""

import dataclasses

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer.datasets import shapes

EMBEDDED_DATASETS = {"tfscale_shapes": shapes.load_or_prepare}
tfds.disable_progress_bar()  # Progress bars would flood logs and CI output.


@dataclasses.dataclass(frozen=True)
class Split:
    """One split held in host memory (uint8 images, int32 labels)."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.labels)


def _not_prepared(config: ml_collections.ConfigDict, data_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {config.name!r} is not prepared in {data_dir}; prepare it once "
        f"on a machine with network (`tfds build {config.name} --data_dir=DIR`, copy DIR here) "
        "and pass --config.dataset.data_dir=DIR, or use --config.dataset.name=tfscale_shapes"
    )


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Returns the builder (the embedded one prepared); never downloads.

    Preparation is not pre-checked with `is_prepared()`, which `tfds.testing.mock_data` does not
    patch: reading an unprepared split fails at once in `load_split` / `num_train_examples`.
    """
    if config.name in EMBEDDED_DATASETS:
        return EMBEDDED_DATASETS[config.name](config.data_dir)
    try:
        return tfds.builder(config.name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"dataset.name ({config.name!r}) is not a TFDS dataset; see "
            "`tfds.list_builders()` or use tfscale_shapes"
        ) from error


def _check_fits_in_memory(builder: tfds.core.DatasetBuilder, name: str) -> None:
    """Fails before reading anything if the split cannot be stacked into one host array."""
    shape = builder.info.features["image"].shape
    if None in shape:
        raise ValueError(
            f"dataset {name!r} has variable-size images {shape}; the in-memory step-indexed "
            "pipeline needs fixed-size images and a split that fits in host memory (known limit, "
            "see BUILD_NOTES.md: no streaming pipeline yet). Preview the run with "
            "`python -m trainer.plan --train_examples=N`"
        )


def load_split(config: ml_collections.ConfigDict, split: str) -> Split:
    """Reads a whole split into memory, or fails within seconds saying how to prepare it."""
    builder = _builder(config)
    _check_fits_in_memory(builder, config.name)
    try:
        dataset = builder.as_dataset(split=split, as_supervised=True)
    except AssertionError as error:  # tfds: "could not find data in DIR"; never downloads.
        raise _not_prepared(config, builder.data_dir_root) from error
    # Chunks, not batch_size=-1: that batches by the split size in the metadata, which mocked
    # data lacks (TF then aborts the process reserving sys.maxsize elements).
    chunks = list(tfds.as_numpy(dataset.batch(4096)))
    images = np.concatenate([chunk[0] for chunk in chunks])
    labels = np.concatenate([chunk[1] for chunk in chunks])
    if images.ndim == 3:  # Grayscale datasets without a channel axis.
        images = images[..., None]
    return Split(images=images.astype(np.uint8), labels=labels.astype(np.int32))


def num_classes(config: ml_collections.ConfigDict) -> int:
    """From the dataset's features, which TFDS knows from code even before preparation."""
    return _builder(config).info.features["label"].num_classes


def num_train_examples(config: ml_collections.ConfigDict) -> int:
    """The train split's size from the dataset's metadata, without reading the data."""
    builder = _builder(config)
    if not builder.info.splits:  # Metadata without splits: the dataset was never generated.
        raise _not_prepared(config, builder.data_dir_root)
    return builder.info.splits[config.train_split].num_examples


def _preprocess(images: tf.Tensor) -> tf.Tensor:
    return tf.cast(images, tf.float32) * (2.0 / 255.0) - 1.0


def _shuffled_indices(positions: tf.Tensor, num_examples: int, seed: int) -> tf.Tensor:
    """Maps stream positions to example indices: one permutation of the split per epoch.

    A replica batch spans at most two epochs (it is smaller than the split), so two vectorized
    `index_shuffle` calls with scalar seeds cover it; batched seeds are not supported by the op.
    """
    epochs = positions // num_examples
    offsets = positions % num_examples
    first_epoch = epochs[0]

    def permute(epoch: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.index_shuffle(
            offsets, seed=tf.stack([tf.constant(seed, tf.int64), epoch]), max_index=num_examples - 1
        )

    return tf.where(epochs == first_epoch, permute(first_epoch), permute(first_epoch + 1))


def _replica_positions(
    context: tf.distribute.InputContext,
    global_batch_size: int,
    start_position: int,
    num_steps: int | None,
) -> tf.data.Dataset:
    """Vectors of stream positions, one per replica batch, in the order this worker consumes them.

    Step j covers positions `start_position + j * global_batch_size + [0, global_batch_size)`;
    replica r takes the r-th slice, so the global batch is the same on 1, 2 or 32 replicas.
    """
    per_replica = context.get_per_replica_batch_size(global_batch_size)
    replicas_per_worker = context.num_replicas_in_sync // context.num_input_pipelines
    first_replica = context.input_pipeline_id * replicas_per_worker
    if num_steps is None:
        elements = tf.data.Dataset.counter(0, dtype=tf.int64)
    else:
        elements = tf.data.Dataset.range(num_steps * replicas_per_worker)

    def positions(element: tf.Tensor) -> tf.Tensor:
        step = element // replicas_per_worker
        replica = first_replica + element % replicas_per_worker
        first = start_position + step * global_batch_size + replica * per_replica
        return first + tf.range(per_replica, dtype=tf.int64)

    return elements.map(positions)


def train_dataset_fn(split: Split, *, global_batch_size: int, start_position: int, seed: int):
    """Returns a `dataset_fn` for `strategy.distribute_datasets_from_function`: endless, shuffled
    per epoch, starting at `start_position` examples into the stream."""
    if global_batch_size > split.num_examples:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) exceeds the {split.num_examples} train "
            "examples; use a smaller batch"
        )

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        images, labels = tf.constant(split.images), tf.constant(split.labels)

        def batch_at(positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            indices = _shuffled_indices(positions, split.num_examples, seed)
            return _preprocess(tf.gather(images, indices)), tf.gather(labels, indices)

        positions = _replica_positions(context, global_batch_size, start_position, None)
        batches = positions.map(batch_at, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return batches.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def eval_dataset_fn(split: Split, *, global_batch_size: int):
    """Returns (`dataset_fn`, steps) covering the split once, padded to whole global batches.

    Padding examples carry weight 0, so every replica sees a full static-shape batch (as TPUs need)
    and the metrics count each real example exactly once.
    """
    num_steps = -(-split.num_examples // global_batch_size)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        images, labels = tf.constant(split.images), tf.constant(split.labels)

        def batch_at(positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            weights = tf.cast(positions < split.num_examples, tf.float32)
            indices = tf.minimum(positions, split.num_examples - 1)
            return _preprocess(tf.gather(images, indices)), tf.gather(labels, indices), weights

        positions = _replica_positions(context, global_batch_size, 0, num_steps)
        return positions.map(batch_at).prefetch(tf.data.AUTOTUNE)

    return dataset_fn, num_steps

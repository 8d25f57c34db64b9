"""Input pipelines whose position is a number: batch k is a pure function of (seed, examples seen).

Why step-indexed: TF 2.21 cannot checkpoint a distributed iterator, and `Dataset.skip` is linear in
the position. Here the train stream is an infinite sequence of example *positions*; position p
reads example `index_shuffle(p mod N, seed=[seed, p div N])` (a fresh permutation each epoch), and
its augmentation is drawn from `[seed, p]` too (preprocessing.py). A run that resumes after E
examples simply starts the stream at E: O(1), on any strategy, with any global batch, with no
repeated or skipped example. It needs random access to examples, which sources.py provides (host
memory or ArrayRecord files).
"""

import sys
from collections.abc import Callable

import tensorflow as tf

from trainer import data_service
from trainer import preprocessing as preprocessing_lib
from trainer.errors import ConfigError
from trainer.sources import Split

IDENTITY = preprocessing_lib.Preprocessing()


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
    batch_size: int,
    start_position: int,
    num_steps: int | None,
) -> tf.data.Dataset:
    """Vectors of stream positions, one per replica batch, in the order this worker consumes them.

    `batch_size` is the examples of one element over all replicas (a global batch, or a
    micro-batch). Element j covers positions `start_position + j * batch_size + [0, batch_size)`;
    replica r takes the r-th slice, so the batch is the same on 1, 2 or 32 replicas.
    """
    per_replica = context.get_per_replica_batch_size(batch_size)
    replicas_per_worker = context.num_replicas_in_sync // context.num_input_pipelines
    first_replica = context.input_pipeline_id * replicas_per_worker
    if num_steps is None:  # Endless: more than any run reads, with positions within int64.
        num_steps = sys.maxsize // (2 * batch_size)
    # A range, not `Dataset.counter`: the tf.data service splits a range among its workers
    # element by element, while a counter (a scan) would run whole on each, each making every batch.
    elements = tf.data.Dataset.range(num_steps * replicas_per_worker)

    def positions(element: tf.Tensor) -> tf.Tensor:
        step = element // replicas_per_worker
        replica = first_replica + element % replicas_per_worker
        first = start_position + step * batch_size + replica * per_replica
        return first + tf.range(per_replica, dtype=tf.int64)

    return elements.map(positions)


def _check_shape(split: Split, preprocessing: preprocessing_lib.Preprocessing) -> None:
    """Fails now, not in a tf.data thread, when images need a `dataset.image_size`."""
    preprocessing.output_shape(split.image_shape)


def _replica_batches(
    split: Split,
    indexed: tf.data.Dataset,
    preprocessing: preprocessing_lib.Preprocessing,
    transform: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    per_replica: int,
) -> tf.data.Dataset:
    """(indices, positions) vectors -> (images, labels, positions) replica batches.

    Identity preprocessing only scales pixels, done on whole decoded batches (the fast path);
    otherwise each example is decoded and `transform`ed on its own, in parallel, in fixed order.
    """
    read = split.reader()
    parallel = {"num_parallel_calls": tf.data.AUTOTUNE, "deterministic": True}
    if preprocessing.is_identity:

        def whole_batch(indices, positions):
            images, labels = split.decode_batch(read(indices))
            return preprocessing_lib.normalize(images), labels, positions

        return indexed.map(whole_batch, **parallel)

    def example(record, position):
        image, label = split.decode(record)
        return transform(image, position), label, position

    records = indexed.map(lambda indices, positions: (read(indices), positions), **parallel)
    return records.unbatch().map(example, **parallel).batch(per_replica, drop_remainder=True)


def train_dataset_fn(
    split: Split,
    *,
    global_batch_size: int,
    start_position: int,
    seed: int,
    preprocessing: preprocessing_lib.Preprocessing = IDENTITY,
    accumulation_steps: int = 1,
    service_address: str = "",
):
    """Returns a `dataset_fn` for `strategy.distribute_datasets_from_function`: endless, shuffled
    per epoch, starting at `start_position` examples into the stream.

    Each element is a micro-batch of `global_batch_size / accumulation_steps` examples (all
    replicas together); `accumulation_steps` consecutive ones are one update's global batch, the
    same examples as without accumulation, so positions count examples either way. With a
    `service_address`, everything up to the finished replica batches runs on that tf.data
    service's workers (data_service.py says what that preserves); only the prefetch runs here.
    """
    if global_batch_size > split.num_examples:
        raise ConfigError(
            f"global_batch_size ({global_batch_size}) exceeds the {split.num_examples} train "
            "examples; use a smaller batch"
        )
    _check_shape(split, preprocessing)

    def transform(image: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
        return preprocessing.train_example(image, position, seed)

    micro_batch_size = global_batch_size // accumulation_steps  # The plan checked it divides.

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        positions = _replica_positions(context, micro_batch_size, start_position, None)
        indexed = positions.map(lambda p: (_shuffled_indices(p, split.num_examples, seed), p))
        per_replica = context.get_per_replica_batch_size(micro_batch_size)
        batches = _replica_batches(split, indexed, preprocessing, transform, per_replica)
        batches = batches.map(lambda images, labels, _: (images, labels))
        if service_address:
            batches = data_service.distribute(batches, service_address)
        return batches.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


def eval_dataset_fn(
    split: Split,
    *,
    global_batch_size: int,
    preprocessing: preprocessing_lib.Preprocessing = IDENTITY,
):
    """Returns (`dataset_fn`, steps) covering the split once, padded to whole global batches.

    Padding examples carry weight 0, so every replica sees a full static-shape batch (as TPUs need)
    and the metrics count each real example exactly once.
    """
    num_steps = -(-split.num_examples // global_batch_size)
    _check_shape(split, preprocessing)

    def transform(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
        return preprocessing.eval_example(image)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        positions = _replica_positions(context, global_batch_size, 0, num_steps)
        indexed = positions.map(lambda p: (tf.minimum(p, split.num_examples - 1), p))
        per_replica = context.get_per_replica_batch_size(global_batch_size)
        batches = _replica_batches(split, indexed, preprocessing, transform, per_replica)

        def weighted(images, labels, positions):
            return images, labels, tf.cast(positions < split.num_examples, tf.float32)

        return batches.map(weighted).prefetch(tf.data.AUTOTUNE)

    return dataset_fn, num_steps

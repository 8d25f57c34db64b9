"""Where examples come from: a TFDS split held in host memory, or read by index from ArrayRecord.

Both kinds answer one question, "the examples at these indices", which is all the step-indexed
stream in data.py asks. So exact resume, any-topology batches and per-replica slicing work the same
over a 12k-image toy split in memory and over ImageNet on disk, where each host reads only the
records of its own replicas.

Which one a split gets follows how it is prepared: fixed-size images in TFRecord files that fit
in `IN_MEMORY_LIMIT_BYTES` are loaded into memory (fastest); ArrayRecord files are read by index
(any size). TFRecord has no random access, and streaming it would make a resume at epoch 80 reread
80 epochs (`Dataset.skip`), so anything else is refused with the command that converts it
(`trainer/datasets/convert.py`).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from trainer.datasets import shapes
from trainer.errors import ConfigError, UserError

EMBEDDED_DATASETS = {
    "tfscale_shapes": shapes.load_or_prepare,
    "tfscale_shapes_variable": shapes.load_or_prepare_variable,
}
IN_MEMORY_LIMIT_BYTES = 8 * 2**30  # Larger splits must be read by index (ArrayRecord).
tfds.disable_progress_bar()  # Progress bars would flood logs and CI output.


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """The dataset's files are not in `data_dir`; the message gives the command that makes them."""


class Split(Protocol):
    """One split of a dataset, as the step-indexed stream in data.py reads it: by example index.

    `read` runs inside a tf.data map on a vector of indices and returns their records in one
    call; `decode` turns one record into (uint8 image [H, W, C], int32 label); `decode_batch`
    does the same for a whole read, when every image has the split's fixed `image_shape`.
    """

    @property
    def num_examples(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int | None, ...]: ...

    def reader(self) -> Callable[[tf.Tensor], Any]:
        """The function reading records by index; call it inside a `dataset_fn`."""

    def decode(self, record: Any) -> tuple[tf.Tensor, tf.Tensor]: ...

    def decode_batch(self, records: Any) -> tuple[tf.Tensor, tf.Tensor]: ...


@dataclasses.dataclass(frozen=True)
class InMemorySplit:
    """One split held in host memory (uint8 images, int32 labels)."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int | None, ...]:
        return self.images.shape[1:]

    def reader(self) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        """Call inside a `dataset_fn`: the constants then live on that worker's input device."""
        images, labels = tf.constant(self.images), tf.constant(self.labels)
        return lambda indices: (tf.gather(images, indices), tf.gather(labels, indices))

    def decode(self, example: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """One (image, label) of a read batch: already decoded."""
        return example

    def decode_batch(self, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """A whole read: already decoded (the fast path, no per-example work)."""
        return batch


@dataclasses.dataclass(frozen=True)
class RecordSplit:
    """One split read by example index from ArrayRecord files; nothing is held in memory."""

    records: Sequence[bytes]  # A TFDS ArrayRecord data source returning serialized examples.
    features: tfds.features.FeaturesDict
    image_key: str
    label_key: str

    @property
    def num_examples(self) -> int:
        return len(self.records)

    @property
    def image_shape(self) -> tuple[int | None, ...]:
        return self.features[self.image_key].shape

    def reader(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """Reads a vector of indices in one call: ArrayRecord fetches them in parallel threads."""

        def fetch(indices: tf.Tensor) -> np.ndarray:
            return np.array(self.records.__getitems__(indices.numpy().tolist()), dtype=object)

        def read(indices: tf.Tensor) -> tf.Tensor:
            serialized = tf.py_function(fetch, [indices], tf.string)
            return tf.ensure_shape(serialized, indices.shape)

        return read

    def decode(self, serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One serialized example -> (uint8 image [H, W, C], int32 label)."""
        example = self.features.deserialize_example(
            serialized, decoders={self.image_key: tfds.decode.SkipDecoding()}
        )
        shape = self.image_shape
        image = tf.io.decode_image(
            example[self.image_key], channels=shape[-1], expand_animations=False
        )
        image = tf.ensure_shape(image, shape)
        return image, tf.cast(example[self.label_key], tf.int32)

    def decode_batch(self, serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """A vector of serialized examples of fixed-size images -> (images, labels)."""
        signature = (
            tf.TensorSpec(self.image_shape, tf.uint8),
            tf.TensorSpec([], tf.int32),
        )
        return tf.map_fn(self.decode, serialized, fn_output_signature=signature)


def _not_prepared(
    config: ml_collections.ConfigDict, data_dir: str, file_format: str = "tfrecord"
) -> "DatasetNotPreparedError":
    return DatasetNotPreparedError(
        f"dataset {config.name!r} is not prepared in {data_dir}; prepare it once where it can be "
        f"downloaded (`python -m trainer.datasets.build --dataset={config.name} --data_dir=DIR "
        f"--file_format={file_format}`, copy DIR here) and pass --config.dataset.data_dir=DIR, "
        "or use --config.dataset.name=tfscale_shapes"
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
        raise ConfigError(
            f"dataset.name ({config.name!r}) is not a TFDS dataset; see "
            "`tfds.list_builders()` or use tfscale_shapes"
        ) from error


def _convert_command(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> str:
    return (
        f"`python -m trainer.datasets.convert --dataset={config.name} "
        f"--data_dir={config.data_dir or '~/tensorflow_datasets'} --out_data_dir=NEW_DIR` and pass "
        "--config.dataset.data_dir=NEW_DIR"
    )


def _in_memory_refusal(builder: tfds.core.DatasetBuilder, split: str) -> str | None:
    """Why `split` cannot be held in memory, or None if it can."""
    shape = builder.info.features["image"].shape
    if None in shape:
        return f"has variable-size images {shape}"
    if builder.info.splits and split in builder.info.splits:
        size = builder.info.splits[split].num_examples * int(np.prod(shape))
        if size > IN_MEMORY_LIMIT_BYTES:
            return f"split {split!r} needs {size / 2**30:.1f} GiB of host memory as uint8"
    return None


def load_split(config: ml_collections.ConfigDict, split: str) -> Split:
    """Opens `split` the fastest way its files allow, or fails within seconds saying what to do."""
    builder = _builder(config)
    formats = builder.info.available_file_formats()
    has_array_record = file_adapters.FileFormat.ARRAY_RECORD in formats
    refusal = _in_memory_refusal(builder, split)
    if has_array_record and (refusal or file_adapters.FileFormat.TFRECORD not in formats):
        return _open_records(builder, config, split)
    if refusal and not builder.info.splits:  # Not prepared at all: say how, in the right format.
        raise _not_prepared(config, builder.data_dir_root, file_format="array_record")
    if refusal:
        raise ConfigError(
            f"dataset {config.name!r} {refusal}; it can only be read by index from ArrayRecord "
            "files, but it is prepared as TFRecord. Convert it once: "
            + _convert_command(config, builder)
        )
    return _read_into_memory(builder, config, split)


def _read_into_memory(
    builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, split: str
) -> InMemorySplit:
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
    return InMemorySplit(images=images.astype(np.uint8), labels=labels.astype(np.int32))


def _open_records(
    builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict, split: str
) -> RecordSplit:
    if not builder.info.splits:  # Metadata without splits: the dataset was never generated.
        raise _not_prepared(config, builder.data_dir_root)
    records = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    image_key, label_key = builder.info.supervised_keys
    return RecordSplit(records, builder.info.features, image_key, label_key)


def num_classes(config: ml_collections.ConfigDict) -> int:
    """From the dataset's features, which TFDS knows from code even before preparation."""
    return _builder(config).info.features["label"].num_classes


def num_train_examples(config: ml_collections.ConfigDict) -> int:
    """The train split's size from the dataset's metadata, without reading the data."""
    builder = _builder(config)
    if not builder.info.splits:  # Metadata without splits: the dataset was never generated.
        raise _not_prepared(config, builder.data_dir_root)
    return builder.info.splits[config.train_split].num_examples

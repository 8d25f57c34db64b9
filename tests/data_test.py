"""Tests for trainer/data.py: the step-indexed train stream, replica split, eval padding, TFDS."""

import time
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import testutil

from trainer import data, sources
from trainer.datasets import shapes


def _indexed_split(num_examples: int) -> sources.InMemorySplit:
    """Example i has label i and every pixel equal to i, so a batch says which examples it holds."""
    assert num_examples <= 256  # Pixel values are uint8.
    index = np.arange(num_examples)
    images = np.broadcast_to(index[:, None, None, None], (num_examples, 2, 2, 1))
    return sources.InMemorySplit(images=images.astype(np.uint8), labels=index.astype(np.int32))


def _pixel_indices(images: np.ndarray) -> np.ndarray:
    """Inverts the [-1, 1] scaling of the pipeline; one index per example."""
    indices = np.rint((images + 1.0) * 255.0 / 2.0).astype(np.int64)
    assert (indices == indices[:, :1, :1, :1]).all()  # Every pixel of an example agrees.
    return indices[:, 0, 0, 0]


def _stream(split, *, global_batch_size, start_position, seed, steps):
    """`steps` global batches (images, labels) of the train stream on a single input pipeline."""
    dataset_fn = data.train_dataset_fn(
        split, global_batch_size=global_batch_size, start_position=start_position, seed=seed
    )
    dataset = dataset_fn(tf.distribute.InputContext())
    return [(images.numpy(), labels.numpy()) for images, labels in dataset.take(steps)]


def _positions(split, *, global_batch_size, start_position, seed, steps) -> np.ndarray:
    """The example indices of `steps` consecutive global batches, flattened in stream order."""
    batches = _stream(
        split,
        global_batch_size=global_batch_size,
        start_position=start_position,
        seed=seed,
        steps=steps,
    )
    return np.concatenate([labels for _, labels in batches])


@pytest.mark.parametrize("seed, start_position", [(0, 0), (0, 17), (5, 30), (123, 1000)])
def test_train_stream_is_a_pure_function_of_seed_and_position(seed, start_position):
    split = _indexed_split(12)
    kwargs = dict(global_batch_size=5, start_position=start_position, seed=seed, steps=6)
    first, second = _stream(split, **kwargs), _stream(split, **kwargs)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second, strict=True):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)
    # The images are the gathered examples themselves, preprocessed to [-1, 1].
    for images, labels in first:
        assert images.dtype == np.float32 and images.shape == (5, 2, 2, 1)
        assert images.min() >= -1.0 and images.max() <= 1.0
        np.testing.assert_array_equal(_pixel_indices(images), labels)


@pytest.mark.parametrize(
    "num_examples, global_batch_size, resume_step",
    [
        (12, 4, 2),  # Inside the first epoch, the batch divides the split.
        (12, 4, 3),  # Exactly at the epoch boundary.
        (10, 4, 3),  # Batch does not divide the split; position 12 is in epoch 1.
        (10, 4, 2),  # The first batch after resuming spans epochs 0 and 1.
        (7, 7, 5),  # Global batch == split size: every batch is one whole epoch.
        (9, 2, 13),  # Several epochs in.
    ],
)
def test_resume_at_step_gives_the_rest_of_the_uninterrupted_stream(
    num_examples, global_batch_size, resume_step
):
    split = _indexed_split(num_examples)
    more_steps = 5
    uninterrupted = _stream(
        split,
        global_batch_size=global_batch_size,
        start_position=0,
        seed=3,
        steps=resume_step + more_steps,
    )
    resumed = _stream(
        split,
        global_batch_size=global_batch_size,
        start_position=resume_step * global_batch_size,
        seed=3,
        steps=more_steps,
    )
    assert len(resumed) == more_steps
    for (images_a, labels_a), (images_b, labels_b) in zip(
        uninterrupted[resume_step:], resumed, strict=True
    ):
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(images_a, images_b)


@pytest.mark.parametrize("num_examples, global_batch_size", [(16, 4), (16, 5), (13, 13), (20, 3)])
def test_every_epoch_is_a_permutation_with_its_own_order(num_examples, global_batch_size):
    epochs = 3
    steps = -(-epochs * num_examples // global_batch_size)
    positions = _positions(
        _indexed_split(num_examples),
        global_batch_size=global_batch_size,
        start_position=0,
        seed=0,
        steps=steps,
    )
    orders = positions[: epochs * num_examples].reshape(epochs, num_examples)
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(num_examples))
    # Each epoch draws its own order (equal orders by chance: 1 in 13! at worst here).
    assert len({tuple(order) for order in orders}) == epochs
    # Starting at a later epoch reads that epoch's permutation from its first position.
    later = _positions(
        _indexed_split(num_examples),
        global_batch_size=num_examples,
        start_position=2 * num_examples,
        seed=0,
        steps=1,
    )
    np.testing.assert_array_equal(later, orders[2])


def test_different_seeds_give_different_orders():
    split = _indexed_split(16)
    orders = [
        _positions(split, global_batch_size=16, start_position=0, seed=seed, steps=1)
        for seed in (0, 1, 2)
    ]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(16))
    assert len({tuple(order) for order in orders}) == 3


@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("accumulation_steps", [2, 4])
def test_micro_batches_are_the_global_batches_cut_in_stream_order(accumulation_steps, num_replicas):
    """k micro-batches in a row hold exactly one global batch, so positions still count examples
    and the update sees the same examples as without accumulation."""
    split = _indexed_split(20)
    global_batch_size, steps = 8, 5
    whole = _positions(
        split, global_batch_size=global_batch_size, start_position=3, seed=7, steps=steps
    )
    dataset_fn = data.train_dataset_fn(
        split,
        global_batch_size=global_batch_size,
        start_position=3,
        seed=7,
        accumulation_steps=accumulation_steps,
    )
    micro_steps = testutil.distributed_steps(
        testutil.mirrored(num_replicas), dataset_fn, steps * accumulation_steps
    )
    per_replica = global_batch_size // accumulation_steps // num_replicas
    labels = [replica[1] for micro_step in micro_steps for replica in micro_step]
    assert {len(replica_labels) for replica_labels in labels} == {per_replica}
    np.testing.assert_array_equal(np.concatenate(labels), whole)


@pytest.mark.parametrize("num_replicas", [1, 2, 4])
@pytest.mark.parametrize("start_position", [0, 12])
def test_replicas_split_the_same_global_batch(num_replicas, start_position):
    split = _indexed_split(20)  # 8 does not divide 20: steps cross epoch boundaries mid-batch.
    global_batch_size, steps = 8, 6

    def run(strategy):
        dataset_fn = data.train_dataset_fn(
            split, global_batch_size=global_batch_size, start_position=start_position, seed=7
        )
        return testutil.distributed_steps(strategy, dataset_fn, steps)

    reference = run(testutil.mirrored(1))
    replicated = run(testutil.mirrored(num_replicas))
    assert len(reference) == len(replicated) == steps
    for (whole,), replicas in zip(reference, replicated, strict=True):
        assert whole[1].shape == (global_batch_size,)
        assert len(replicas) == num_replicas
        for images, labels in replicas:
            assert labels.shape == (global_batch_size // num_replicas,)
            assert images.shape == (global_batch_size // num_replicas, 2, 2, 1)
            np.testing.assert_array_equal(_pixel_indices(images), labels)
        np.testing.assert_array_equal(np.concatenate([r[1] for r in replicas]), whole[1])
        np.testing.assert_array_equal(np.concatenate([r[0] for r in replicas]), whole[0])
    # Independent of tf.distribute: the single-pipeline stream is the same global batches.
    plain = _stream(
        split, global_batch_size=global_batch_size, start_position=start_position, seed=7, steps=6
    )
    for (whole,), (_, labels) in zip(reference, plain, strict=True):
        np.testing.assert_array_equal(whole[1], labels)


@pytest.mark.parametrize(
    "num_examples, global_batch_size",
    [
        (11, 4),  # 3 steps, 1 padding example.
        (13, 6),  # 3 steps, 5 padding examples: the last replica batch is all padding.
        (12, 4),  # Divides: no padding.
        (3, 8),  # Global batch larger than the split: one step, mostly padding.
    ],
)
def test_eval_covers_each_example_once_padded_with_weight_zero(num_examples, global_batch_size):
    split = _indexed_split(num_examples)
    dataset_fn, num_steps = data.eval_dataset_fn(split, global_batch_size=global_batch_size)
    assert num_steps == int(np.ceil(num_examples / global_batch_size))
    steps = testutil.distributed_steps(testutil.mirrored(2), dataset_fn, steps=num_steps + 5)
    assert len(steps) == num_steps  # The eval dataset ends after one pass.

    labels, weights = [], []
    for replicas in steps:
        assert len(replicas) == 2
        for images, replica_labels, replica_weights in replicas:
            assert replica_labels.shape == replica_weights.shape == (global_batch_size // 2,)
            assert images.shape[0] == global_batch_size // 2
            np.testing.assert_array_equal(_pixel_indices(images), replica_labels)
            labels.append(replica_labels)
            weights.append(replica_weights)
    labels, weights = np.concatenate(labels), np.concatenate(weights)
    assert set(np.unique(weights)) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.sort(labels[weights == 1.0]), np.arange(num_examples))
    assert (weights == 0.0).sum() == num_steps * global_batch_size - num_examples
    # Padding comes after every real example, so the weighted sum counts each one exactly once.
    assert (weights[:num_examples] == 1.0).all()


def test_global_batch_larger_than_split_is_refused():
    with pytest.raises(ValueError, match=r"global_batch_size \(11\)"):
        data.train_dataset_fn(_indexed_split(10), global_batch_size=11, start_position=0, seed=0)


@pytest.mark.parametrize("split_name", ["train", "test"])
def test_embedded_dataset_loads_into_memory(data_dir, split_name):
    config = testutil.dataset_config("tfscale_shapes", data_dir)
    split = sources.load_split(config, split_name)
    num_classes = sources.num_classes(config)
    assert num_classes == len(shapes.CLASS_NAMES)
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert split.images.shape == (split.num_examples, 32, 32, 3)
    assert split.labels.shape == (split.num_examples,)
    assert split.labels.min() >= 0 and split.labels.max() < num_classes
    assert split.num_examples == shapes.SPLITS[split_name][0]
    if split_name == "train":
        assert sources.num_train_examples(config) == split.num_examples
    # Exactly the renderer's (image, label) pairs, in TFDS's order; the PNG round trip is lossless.
    if split_name == "test":
        images, labels = shapes.render_examples(*shapes.SPLITS[split_name])
        rendered = sorted(zip((i.tobytes() for i in images), labels.tolist(), strict=True))
        loaded = zip((i.tobytes() for i in split.images), split.labels.tolist(), strict=True)
        assert sorted(loaded) == rendered


@pytest.mark.parametrize("read", [sources.load_split, sources.num_train_examples])
def test_missing_dataset_fails_fast_saying_how_to_prepare_it(tmp_path, read):
    config = testutil.dataset_config("mnist", str(tmp_path))
    args = (config, "train") if read is sources.load_split else (config,)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        read(*args)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "'mnist'" in message
    assert str(tmp_path) in message
    assert "python -m trainer.datasets.build --dataset=mnist" in message
    assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or written.


def test_unknown_dataset_name_is_a_value_error(tmp_path):
    config = testutil.dataset_config("no_such_dataset_xyz", str(tmp_path))
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        sources.load_split(config, "train")


@pytest.mark.parametrize(
    "name, image_shape",
    [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))],
)
def test_mocked_tfds_dataset_flows_through_the_pipeline(tmp_path, name, image_shape):
    config = testutil.dataset_config(name, str(tmp_path))
    with tfds.testing.mock_data(num_examples=12):
        split = sources.load_split(config, "train")
        num_classes = sources.num_classes(config)
    assert num_classes == 10
    assert split.images.shape == (12, *image_shape) and split.images.dtype == np.uint8
    assert split.labels.shape == (12,) and split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < num_classes

    dataset_fn = data.train_dataset_fn(split, global_batch_size=8, start_position=0, seed=0)
    steps = testutil.distributed_steps(testutil.mirrored(2), dataset_fn, steps=3)
    seen = []
    for replicas in steps:
        assert len(replicas) == 2
        for images, labels in replicas:
            assert images.shape == (4, *image_shape) and images.dtype == np.float32
            assert labels.shape == (4,)
            seen.append(labels)
    # 24 positions = 2 epochs of 12: each label appears as often as in the split, twice.
    np.testing.assert_array_equal(
        np.sort(np.concatenate(seen)), np.sort(np.concatenate([split.labels] * 2))
    )


def test_grayscale_images_without_channel_axis_get_one(monkeypatch):
    images = np.arange(5 * 6 * 6, dtype=np.uint8).reshape(5, 6, 6)  # (N, H, W): no channels.
    labels = np.arange(5, dtype=np.int64)

    class FakeBuilder:
        info = types.SimpleNamespace(
            features={"image": types.SimpleNamespace(shape=(6, 6))},
            splits={},
            available_file_formats=set,
        )

        def as_dataset(self, split, as_supervised):
            assert split == "train" and as_supervised
            return tf.data.Dataset.from_tensor_slices((images, labels))

    monkeypatch.setattr(sources, "_builder", lambda config: FakeBuilder())
    split = sources.load_split(testutil.dataset_config("fake", "/nonexistent"), "train")
    assert split.images.shape == (5, 6, 6, 1)
    np.testing.assert_array_equal(split.images[..., 0], images)
    np.testing.assert_array_equal(split.labels, labels)

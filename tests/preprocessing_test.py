"""Tests for trainer/preprocessing.py, and for augmented streams read by index (data.py)."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import testutil

from trainer import data, preprocessing, sources

CROP = preprocessing.Preprocessing(
    image_size=24, augment="inception_crop", center_crop_fraction=0.875
)


def _image(height: int, width: int) -> tf.Tensor:
    """A ramp with period 251 (prime): any crop or flip changes the output."""
    values = np.arange(height * width * 3).reshape(height, width, 3) % 251
    return tf.constant(values, tf.uint8)


def _dataset_config(**fields) -> ml_collections.ConfigDict:
    config = {"image_size": None, "augment": "none", "center_crop_fraction": 1.0}
    return ml_collections.ConfigDict({**config, **fields})


def test_inception_crop_is_a_pure_function_of_seed_and_position():
    image = _image(50, 70)
    outputs = {
        (seed, position): CROP.train_example(image, tf.constant(position, tf.int64), seed).numpy()
        for seed in (0, 1)
        for position in range(6)
    }
    again = CROP.train_example(image, tf.constant(3, tf.int64), 0).numpy()
    np.testing.assert_array_equal(outputs[0, 3], again)
    for output in outputs.values():
        assert output.shape == (24, 24, 3) and output.dtype == np.float32
        assert output.min() >= -1.0 and output.max() <= 1.0
    distinct = {output.tobytes() for output in outputs.values()}
    assert len(distinct) == len(outputs)  # Each (seed, position) gets its own crop.


def test_inception_crop_samples_areas_and_flips_like_the_recipe():
    """Over many positions: crops cover 8%..100% of the image and about half are mirrored."""
    rows, cols = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    # Red encodes the source row, green the source column: the output shows where it came from.
    image = tf.constant(np.stack([rows * 4, cols * 4, rows * 0], -1), tf.uint8)
    areas, flips = [], 0
    for position in range(200):
        output = CROP.train_example(image, tf.constant(position, tf.int64), 7).numpy()
        pixels = (output + 1.0) * 255.0 / 2.0 / 4.0  # Back to source coordinates.
        height = pixels[..., 0].max() - pixels[..., 0].min() + 1
        width = pixels[..., 1].max() - pixels[..., 1].min() + 1
        areas.append(height * width / 64**2)
        flips += pixels[0, 0, 1] > pixels[0, -1, 1]  # Columns now run right to left.
    assert min(areas) < 0.2 and max(areas) > 0.8
    # Extents read back from the resized crop lose a little at the edges (interpolation), so the
    # recipe's 8% floor is checked with slack.
    assert all(0.05 <= area <= 1.0 for area in areas)
    assert 70 <= flips <= 130


def test_center_crop_takes_the_middle_of_the_shorter_side():
    image = _image(8, 4)
    # Fraction 1 of a 4-wide image: rows 2..5, all columns; resizing 4 -> 4 changes nothing.
    center = preprocessing.Preprocessing(image_size=4).eval_example(image).numpy()
    np.testing.assert_array_equal(center, preprocessing.normalize(image[2:6]).numpy())
    # Fraction 0.5: the central 2x2 block (rows 3..4, columns 1..2), kept at 2x2.
    half = preprocessing.Preprocessing(image_size=2, center_crop_fraction=0.5)
    np.testing.assert_array_equal(
        half.eval_example(image).numpy(), preprocessing.normalize(image[3:5, 1:3]).numpy()
    )


def test_train_without_augmentation_is_the_eval_transform():
    plain = preprocessing.Preprocessing(image_size=16, center_crop_fraction=0.875)
    image = _image(40, 30)
    np.testing.assert_array_equal(
        plain.train_example(image, tf.constant(5, tf.int64), 0).numpy(),
        plain.eval_example(image).numpy(),
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"augment": "mixup"}, "dataset.augment .*'mixup'.* none, inception_crop"),
        ({"augment": "inception_crop"}, "set --config.dataset.image_size"),
        ({"image_size": 0}, r"dataset.image_size \(0\) must be positive"),
        ({"center_crop_fraction": 1.5}, r"dataset.center_crop_fraction \(1.5\) must be in"),
    ],
)
def test_bad_image_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        preprocessing.from_config(_dataset_config(**fields))


def test_variable_size_images_need_an_image_size():
    with pytest.raises(ValueError, match="variable size .*set --config.dataset.image_size"):
        preprocessing.Preprocessing().output_shape((None, None, 3))
    assert CROP.output_shape((None, None, 3)) == (24, 24, 3)
    assert preprocessing.Preprocessing().output_shape((32, 32, 1)) == (32, 32, 1)


@pytest.fixture(scope="module")
def variable_split(data_dir) -> sources.RecordSplit:
    config = ml_collections.ConfigDict({"name": "tfscale_shapes_variable", "data_dir": data_dir})
    return sources.load_split(config, "train")


def _global_batches(split, strategy, *, start_position: int, steps: int) -> list[np.ndarray]:
    """`steps` global batches of images, the replicas' slices concatenated in replica order."""
    dataset_fn = data.train_dataset_fn(
        split, global_batch_size=8, start_position=start_position, seed=3, preprocessing=CROP
    )
    per_step = testutil.distributed_steps(strategy, dataset_fn, steps)
    return [np.concatenate([images for images, _ in replicas]) for replicas in per_step]


def test_augmented_stream_resumes_exactly_and_agrees_across_replica_counts(variable_split):
    """Position decides example *and* crop: resuming at E, or on 1/2/4 replicas, changes nothing."""
    straight = _global_batches(variable_split, testutil.mirrored(1), start_position=0, steps=6)
    resumed = _global_batches(variable_split, testutil.mirrored(1), start_position=24, steps=3)
    for a, b in zip(straight[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    for replicas in (2, 4):
        split_up = _global_batches(
            variable_split, testutil.mirrored(replicas), start_position=0, steps=6
        )
        for a, b in zip(straight, split_up, strict=True):
            np.testing.assert_array_equal(a, b)
    assert straight[0].shape == (8, 24, 24, 3)

"""Tests for trainer/sources.py and trainer/datasets/{build,convert}.py: which split kind a
dataset gets, reading by index from ArrayRecord, and the refusals that say how to convert."""

import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import testutil

from trainer import data, preprocessing, sources
from trainer.datasets import convert, shapes


@pytest.fixture(scope="module")
def shapes_as_array_record(data_dir, tmp_path_factory) -> str:
    """The fixed-size embedded dataset converted to ArrayRecord: same examples, other file kind."""
    sources.load_split(testutil.dataset_config("tfscale_shapes", data_dir), "test")  # Prepared.
    out = str(tmp_path_factory.mktemp("array_record"))
    convert.convert("tfscale_shapes", data_dir, out)
    return out


def _tfrecord_records(version_dir, split: str) -> list[bytes]:
    files = sorted(tf.io.gfile.glob(f"{version_dir}/*-{split}.tfrecord-*"))
    return list(tf.data.TFRecordDataset(files).as_numpy_iterator())


def _run_module(module: str, *flags: str) -> None:
    """`python -m module flags...` in a fresh process, as a user would type it."""
    subprocess.run(
        [sys.executable, "-m", module, *flags], cwd=testutil.REPO, check=True, timeout=300
    )


def test_embedded_variable_size_dataset_is_read_by_index(data_dir):
    config = testutil.dataset_config("tfscale_shapes_variable", data_dir)
    split = sources.load_split(config, "train")
    assert isinstance(split, sources.RecordSplit)
    assert split.num_examples == shapes.TfscaleShapesVariable.SPLITS["train"][0]
    assert split.image_shape == (None, None, 3)
    read = split.reader()
    indices = tf.constant([0, 7, 3999, 7], tf.int64)
    records = read(indices)
    assert records.shape == (4,)
    assert records[1].numpy() == records[3].numpy()  # The same index reads the same record.
    sizes = set()
    for index in range(40):
        image, label = split.decode(read(tf.constant([index], tf.int64))[0])
        assert image.dtype == tf.uint8 and image.shape[-1] == 3
        assert 32 <= image.shape[0] <= 96 and 32 <= image.shape[1] <= 96
        assert 0 <= int(label) < len(shapes.CLASS_NAMES)
        sizes.add(tuple(image.shape))
    assert len(sizes) > 20  # Really variable, like ImageNet.


def test_record_split_serves_the_same_stream_as_memory(data_dir, shapes_as_array_record):
    """Same examples at the same indices, so every property of the stream carries over."""
    in_memory = sources.load_split(testutil.dataset_config("tfscale_shapes", data_dir), "test")
    records = sources.load_split(
        testutil.dataset_config("tfscale_shapes", shapes_as_array_record), "test"
    )
    assert isinstance(in_memory, sources.InMemorySplit)
    assert isinstance(records, sources.RecordSplit)
    assert records.num_examples == in_memory.num_examples
    crop = preprocessing.Preprocessing(image_size=24, augment="inception_crop")
    # The second start spans the epoch boundary; the crop takes the per-example path on both.
    cases = ((0, data.IDENTITY), (1_990, data.IDENTITY), (0, crop))
    for start_position, image_preprocessing in cases:
        streams = [
            data.train_dataset_fn(
                split,
                global_batch_size=16,
                start_position=start_position,
                seed=4,
                preprocessing=image_preprocessing,
            )
            for split in (in_memory, records)
        ]
        batches = [list(fn(tf.distribute.InputContext()).take(3)) for fn in streams]
        for (images_a, labels_a), (images_b, labels_b) in zip(*batches, strict=True):
            np.testing.assert_array_equal(labels_a, labels_b)
            np.testing.assert_array_equal(images_a, images_b)
    (memory_eval, steps), (records_eval, same_steps) = (
        data.eval_dataset_fn(split, global_batch_size=96) for split in (in_memory, records)
    )
    assert steps == same_steps == 21  # 2000 examples, the last batch padded.
    pairs = zip(
        memory_eval(tf.distribute.InputContext()),
        records_eval(tf.distribute.InputContext()),
        strict=True,
    )
    for batch_a, batch_b in pairs:
        for a, b in zip(batch_a, batch_b, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_split_too_large_for_memory_is_refused_with_the_convert_command(data_dir, monkeypatch):
    monkeypatch.setattr(sources, "IN_MEMORY_LIMIT_BYTES", 1000)
    with pytest.raises(ValueError) as error:
        sources.load_split(testutil.dataset_config("tfscale_shapes", data_dir), "train")
    message = str(error.value)
    assert "GiB of host memory" in message
    assert "python -m trainer.datasets.convert --dataset=tfscale_shapes" in message
    assert "\n" not in message


def test_unprepared_variable_size_dataset_says_to_build_it_as_array_record(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        sources.load_split(testutil.dataset_config("imagenet2012", str(tmp_path)), "train")
    message = str(error.value)
    assert "'imagenet2012' is not prepared in" in message
    assert (
        "python -m trainer.datasets.build --dataset=imagenet2012 --data_dir=DIR "
        "--file_format=array_record" in message
    )
    assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or written.


@pytest.mark.slow  # Runs the convert command: ~7 s.
def test_variable_size_tfrecord_is_refused_with_a_convert_command_that_works(tmp_path):
    """The command in the error message, run as printed, makes the dataset trainable."""
    tfrecord_dir = tmp_path / "tfrecord"
    build = "trainer.datasets.build --dataset=tfscale_shapes_variable --file_format=tfrecord"
    _run_module(*build.split(), f"--data_dir={tfrecord_dir}")
    builder = shapes.TfscaleShapesVariable(data_dir=str(tfrecord_dir))
    config = testutil.dataset_config("tfscale_shapes_variable", str(tfrecord_dir))
    with pytest.raises(ValueError) as error:
        sources.load_split(config, "train")
    message = str(error.value)
    assert "variable-size images" in message and "prepared as TFRecord" in message
    command = re.search(r"`(python -m trainer\.datasets\.convert [^`]*)`", message).group(1)
    array_record_dir = tmp_path / "array_record"
    # The command's own `main` and flag parsing, in-process: `build` ran in a fresh process, and
    # a second one would only add TF's start-up (the two tools' flags cannot share a process).
    module, *flags = command.replace("NEW_DIR", str(array_record_dir)).split()[2:]
    assert module == "trainer.datasets.convert"
    testutil.run_cli_in_process(convert.main, *flags)

    config.data_dir = str(array_record_dir)
    split = sources.load_split(config, "train")
    assert isinstance(split, sources.RecordSplit)
    expected = _tfrecord_records(builder.data_dir, "train")
    indices = tf.range(split.num_examples, dtype=tf.int64)
    assert split.reader()(indices).numpy().tolist() == expected  # Same records, same order.

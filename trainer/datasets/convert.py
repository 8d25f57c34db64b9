"""Copies a TFDS dataset prepared as TFRecord into ArrayRecord files, so it can be read by index.

  python -m trainer.datasets.convert --dataset=imagenet2012 --data_dir=SRC --out_data_dir=DST

then train with `--config.dataset.data_dir=DST`. TFDS's own `tfds convert_format` does the same
but imports Apache Beam even when told not to use it; this needs nothing beyond TFDS. Each shard
keeps its name, record order and length, so example i is the same example in both copies, and
`dataset_info.json` is copied with only its file format changed. Shards convert in parallel
threads (the work is I/O); a rerun skips shards already written.
"""

import concurrent.futures
import json
import os

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import app, flags, logging
from tensorflow_datasets.core import file_adapters

from trainer.errors import ConfigError

_DATASET = flags.DEFINE_string("dataset", None, "TFDS name (with /config and :version if needed).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the dataset is prepared as TFRecord.")
_OUT_DATA_DIR = flags.DEFINE_string("out_data_dir", None, "Where the ArrayRecord copy goes.")
_THREADS = flags.DEFINE_integer("threads", 8, "Shards converted at once.")

_TFRECORD = file_adapters.FileFormat.TFRECORD
_ARRAY_RECORD = file_adapters.FileFormat.ARRAY_RECORD


def _convert_shard(source: str, target: str) -> None:
    if tf.io.gfile.exists(target):
        return
    records = tf.data.TFRecordDataset(source).as_numpy_iterator()
    partial = target + ".incomplete"  # Renamed when whole: a crash never leaves a short shard.
    file_adapters.ArrayRecordFileAdapter.write_examples(
        partial, ((None, record) for record in records)
    )
    tf.io.gfile.rename(partial, target, overwrite=True)


def convert(dataset: str, data_dir: str, out_data_dir: str, threads: int = 8) -> str:
    """Writes the ArrayRecord copy; returns its version directory."""
    builder = tfds.builder(dataset, data_dir=data_dir)
    if _TFRECORD not in builder.info.available_file_formats():
        raise ConfigError(f"{dataset} in {data_dir} has no TFRecord files to convert")
    source_dir = str(builder.data_dir)
    target_dir = os.path.join(out_data_dir, builder.info.full_name)
    tf.io.gfile.makedirs(target_dir)
    shards = []
    for name in tf.io.gfile.listdir(source_dir):
        source = os.path.join(source_dir, name)
        if f".{_TFRECORD.value}-" in name:
            target_name = name.replace(f".{_TFRECORD.value}-", f".{_ARRAY_RECORD.value}-")
            shards.append((source, os.path.join(target_dir, target_name)))
        elif name != "dataset_info.json" and not tf.io.gfile.isdir(source):
            tf.io.gfile.copy(source, os.path.join(target_dir, name), overwrite=True)
    logging.info("converting %d shards of %s to %s", len(shards), dataset, target_dir)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda shard: _convert_shard(*shard), shards))
    with tf.io.gfile.GFile(os.path.join(source_dir, "dataset_info.json")) as f:
        info = json.load(f)
    info["fileFormat"] = _ARRAY_RECORD.value
    info.pop("alternativeFileFormats", None)
    # Written last: TFDS treats a directory with dataset_info.json as prepared.
    with tf.io.gfile.GFile(os.path.join(target_dir, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return target_dir


def main(argv: list[str]) -> None:
    del argv
    target_dir = convert(_DATASET.value, _DATA_DIR.value, _OUT_DATA_DIR.value, _THREADS.value)
    print(f"wrote {target_dir}; train with --config.dataset.data_dir={_OUT_DATA_DIR.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["dataset", "data_dir", "out_data_dir"])
    app.run(main)

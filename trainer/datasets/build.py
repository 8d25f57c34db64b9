"""Prepares a TFDS dataset in the file format the trainer reads it in; run once, where the data is.

  python -m trainer.datasets.build --dataset=imagenet2012 --data_dir=DIR \
    --file_format=array_record --manual_dir=WHERE_THE_TARS_ARE
  python -m trainer.datasets.build --dataset=cifar10 --data_dir=DIR

The `tfds build` command line would do, but in TFDS 4.9.10 it imports Apache Beam at start-up (for
`tfds convert_format`) and fails without it, so this calls the same builder API directly.
ArrayRecord is what large or variable-size datasets need (`trainer/sources.py`).
"""

import tensorflow_datasets as tfds
from absl import app, flags

from trainer.datasets import shapes  # noqa: F401  (registers the embedded builders)

_DATASET = flags.DEFINE_string("dataset", None, "TFDS name (with /config and :version if needed).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where to prepare it (local or gs://).")
_FILE_FORMAT = flags.DEFINE_enum(
    "file_format", "tfrecord", ["tfrecord", "array_record"], "Record file format."
)
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", None, "Where manually downloaded files are (ImageNet's tars)."
)


def main(argv: list[str]) -> None:
    del argv
    builder = tfds.builder(_DATASET.value, data_dir=_DATA_DIR.value, file_format=_FILE_FORMAT.value)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value)
    )
    print(f"prepared {builder.data_dir}; train with --config.dataset.data_dir={_DATA_DIR.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["dataset", "data_dir"])
    app.run(main)

"""A checkpoint as a model other programs run: a SavedModel with preprocessing, and a .keras file.

  python -m trainer.export --workdir=DIR            # newest complete checkpoint -> DIR/export/final
  python -m trainer.export --workdir=DIR --step=N   # ckpt-N -> DIR/export/step-N

The model is rebuilt from the checkpoint's manifest (its config, input shape and classes) without
a distribution strategy and only its weights are read, so an export does not depend on how the
run was distributed, and the trainer's own objects are never touched. What an export directory
holds:

  saved_model.pb, variables/   `serving_default`: uint8 images [batch, H, W, C] at the model's
                               input size -> logits, probabilities, classes (normalize included);
                               `serve_image` (when dataset.image_size is set): one uint8 image of
                               any size [h, w, C] through the eval transform (center crop, resize)
  model.keras                  the bare model (inputs normalized to [-1, 1], outputs logits), for
                               Keras users and fine-tuning (`init_checkpoint`)
  export.json                  which checkpoint, step, input shape, classes and signatures
"""

import contextlib
import json
import os
import random
import sys
from collections.abc import Callable, Iterator

if __name__ == "__main__":  # Only as a tool: the trainer imports this module as a library.
    from trainer import cli

    cli.start_tensorflow(sys.argv)  # TensorFlow's start-up chatter hidden (cli.py).

import keras  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import flags, logging  # noqa: E402

from trainer import checkpointing, features, models, preprocessing  # noqa: E402
from trainer.errors import UserError  # noqa: E402

SAVED_MODEL_SIGNATURES = ("serving_default", "serve_image")


def export_directory(workdir: str, name: str) -> str:
    """WORKDIR/export/NAME: `final`, `step-N`, `best`."""
    return os.path.join(workdir, "export", name)


def model_inputs(manifest: checkpointing.Manifest) -> tuple[tuple[int, int, int], int]:
    """The (input shape, number of classes) the checkpoint's model was built for.

    From the manifest when it records them; for older manifests from the dataset's metadata,
    which TFDS knows from code (no data is read; the embedded datasets are registered by
    importing `trainer.sources`).
    """
    if manifest.input_shape is not None and manifest.num_classes is not None:
        return tuple(manifest.input_shape), manifest.num_classes
    from trainer import sources  # noqa: F401  (registers the embedded TFDS builders)

    dataset = ml_collections.ConfigDict(manifest.config["dataset"])
    info = tfds.builder(dataset.name, data_dir=dataset.data_dir).info
    image_shape = tuple(info.features["image"].shape)
    shape = preprocessing.from_config(dataset).output_shape(image_shape)
    return shape, info.features["label"].num_classes


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Keras draws unseeded initializers' seeds from Python's global RNG: building a model inside
    the trainer must not move it, or a run that exported would differ from one that did not."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _absl_level_kept() -> Iterator[None]:
    """Keras's quiet SavedModel writing sets absl's verbosity and "restores" it as the effective
    level it read, which pins absl's logger to WARNING: a run exporting at its end silenced the
    INFO lines (progress, plan) of the next run in the same process."""
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def load_model(prefix: str, manifest: checkpointing.Manifest) -> keras.Model:
    """Rebuilds the checkpoint's model (no strategy) and reads the weights the run gives back.

    Those are the EMA of the trainable weights when the run kept one (ema_decay > 0; BatchNorm
    statistics are the model's own, see trainer/extras/ema.py), else the weights themselves. Nothing
    else is read.

    Raises:
      CheckpointError: the checkpoint does not hold every weight of the rebuilt model.
    """
    config = ml_collections.ConfigDict(manifest.config)
    input_shape, num_classes = model_inputs(manifest)
    with _global_rng_kept():
        model = models.build_model(config.model, input_shape, num_classes, seed=config.seed)
    # Any decay will do: the averages are read, never updated, here.
    average = None
    if manifest.weight_ema:
        ema = features.require("ema", f"{prefix} holds an EMA of the weights, which")
        average = ema.WeightEMA(model, decay=0.0)
    parts = {"model": model, **({} if average is None else {"ema": average.checkpointed})}
    status = tf.train.Checkpoint(**parts).read(prefix).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as error:
        raise checkpointing.CheckpointError(
            f"{prefix} does not hold the weights of the model its manifest describes "
            f"({str(error).splitlines()[0]})"
        ) from error
    if average is not None:
        average.swap()  # The model now holds the averages (its raw weights are dropped).
    return model


def write_export(
    model: keras.Model,
    image_preprocessing: preprocessing.Preprocessing,
    directory: str,
    info: dict,
) -> None:
    """Writes the SavedModel, model.keras and export.json of `model` into `directory`."""
    input_shape = tuple(model.input_shape[1:])
    archive = keras.export.ExportArchive()
    archive.track(model)

    def outputs(logits: tf.Tensor) -> dict[str, tf.Tensor]:
        return {
            "logits": logits,
            "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1, output_type=tf.int32),
        }

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(model(preprocessing.normalize(images), training=False))

    # The first endpoint is also registered as `serving_default` (what TF Serving calls).
    archive.add_endpoint(
        "serve", serve, input_signature=[tf.TensorSpec([None, *input_shape], tf.uint8, "images")]
    )
    signatures = {"serving_default": f"uint8 images [batch, {', '.join(map(str, input_shape))}]"}
    if image_preprocessing.image_size is not None:

        def serve_image(image: tf.Tensor) -> dict[str, tf.Tensor]:
            example = image_preprocessing.eval_example(image)  # Center crop, resize, normalize.
            return outputs(model(example[tf.newaxis], training=False))

        channels = input_shape[-1]
        archive.add_endpoint(
            "serve_image",
            serve_image,
            input_signature=[tf.TensorSpec([None, None, channels], tf.uint8, "image")],
        )
        signatures["serve_image"] = f"one uint8 image [height, width, {channels}], any size"
    tf.io.gfile.makedirs(directory)
    with _absl_level_kept():
        archive.write_out(directory, verbose=False)
        model.save(os.path.join(directory, "model.keras"))
    info = {
        **info,
        "input_shape": list(input_shape),
        "num_classes": int(model.output_shape[-1]),
        "signatures": {k: f"{v} -> logits, probabilities, classes" for k, v in signatures.items()},
        "keras_model": "model.keras: inputs normalized to [-1, 1], outputs logits",
    }
    with tf.io.gfile.GFile(os.path.join(directory, "export.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)


def read_info(directory: str) -> dict:
    """The export.json of an export directory."""
    with tf.io.gfile.GFile(os.path.join(directory, "export.json")) as f:
        return json.load(f)


def replace_directory(staging: str, final: str) -> None:
    """Moves a fully written `staging` directory to `final`, replacing what was there.

    A reader never sees a half-written export at `final`. A crash between the two renames leaves
    `final.old`, which `recover_directory` puts back.
    """
    old = final + ".old"
    if tf.io.gfile.exists(old):
        tf.io.gfile.rmtree(old)
    if tf.io.gfile.exists(final):
        tf.io.gfile.rename(final, old)
    tf.io.gfile.rename(staging, final)
    if tf.io.gfile.exists(old):
        tf.io.gfile.rmtree(old)


def recover_directory(final: str) -> None:
    """Undoes an interrupted `replace_directory` and drops the debris of interrupted writes."""
    old = final + ".old"
    if not tf.io.gfile.exists(final) and tf.io.gfile.exists(old):
        tf.io.gfile.rename(old, final)
    staging = final + ".staging"
    if tf.io.gfile.exists(staging):
        tf.io.gfile.rmtree(staging)


def export_checkpoint(
    prefix: str,
    manifest: checkpointing.Manifest,
    directory: str,
    add_files: Callable[[str], None] | None = None,
) -> str:
    """Exports the checkpoint at `prefix` to `directory` (replaced whole); returns `directory`.

    `add_files(staging)` may write more into the export before it replaces the old one (best.py
    adds a copy of the checkpoint and best.json).

    Raises:
      UserError: a write failed (e.g. a full disk); the previous export is intact.
    """
    recover_directory(directory)
    staging = directory + ".staging"
    model = load_model(prefix, manifest)
    dataset = ml_collections.ConfigDict(manifest.config["dataset"])
    info = {
        "checkpoint": prefix,
        "weights": "ema" if manifest.weight_ema else "raw",  # EMA: the averaged weights.
        "step": manifest.step,
        "examples_seen": manifest.examples_seen,
        "model": manifest.model,
        "versions": manifest.versions,
    }
    try:
        write_export(model, preprocessing.from_config(dataset), staging, info)
        if add_files is not None:
            add_files(staging)
    except (OSError, tf.errors.OpError) as error:
        reason = (getattr(error, "message", None) or str(error)).strip().splitlines()
        raise UserError(
            f"cannot write the export {directory} ({reason[0] if reason else type(error)}); "
            "the previous export there is intact: free space (or fix the file system) and "
            "export again"
        ) from error
    replace_directory(staging, directory)
    return directory


def export_run(workdir: str, step: int | None = None) -> str:
    """Exports the newest complete checkpoint of `workdir` to WORKDIR/export/final, or the one at
    `step` to WORKDIR/export/step-STEP; returns that directory.

    Raises:
      CheckpointError: no complete checkpoint (at `step`).
    """
    prefix, manifest = checkpointing.find_checkpoint(workdir, step)
    name = "final" if step is None else f"step-{step}"
    return export_checkpoint(prefix, manifest, export_directory(workdir, name))


def log_export(directory: str) -> None:
    """One console line: which step went where, with what signatures."""
    info = read_info(directory)
    logging.info(
        "export | step: %d | wrote %s | %s | model.keras",
        info["step"],
        directory,
        " | ".join(f"{name}: {text}" for name, text in info["signatures"].items()),
    )


def main(argv: list[str]) -> None:
    del argv
    log_export(export_run(flags.FLAGS.workdir, flags.FLAGS.step))


if __name__ == "__main__":
    # Defined only when run as a tool: the trainer imports this module (export at the end, best
    # checkpoint), and absl flags are process-wide.
    flags.DEFINE_integer("step", None, "The checkpoint to export; default: the newest.")
    cli.run(main, "workdir")

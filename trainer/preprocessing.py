"""Image transforms, each a pure function of (image, seed, stream position).

Why stateless: the random crop and flip an example gets are drawn from `[seed, position]`, not from
a stateful generator, so a resumed run (or one on another number of replicas) augments every
example exactly as the uninterrupted run did, and there is no RNG state to checkpoint.

Train: `inception_crop` is the ResNet/ImageNet recipe (Szegedy et al. 2015): a random crop of 8% to
100% of the area with aspect ratio in [3/4, 4/3], resized to `image_size`, flipped with p = 0.5.
Eval (and train with `augment="none"`): the central `center_crop_fraction` of the shorter side,
resized to `image_size` (0.875 = resize to 256, crop 224). With no `image_size` images keep their
native, fixed size.
"""

import dataclasses

import ml_collections
import tensorflow as tf

from trainer.errors import ConfigError

AUGMENTATIONS = ("none", "inception_crop")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What every image goes through before the model; from `config.dataset`."""

    image_size: int | None = None  # Square output side; None = keep the native size.
    augment: str = "none"  # One of AUGMENTATIONS; train only.
    center_crop_fraction: float = 1.0

    @property
    def is_identity(self) -> bool:
        """True when images only need scaling to [-1, 1]: the batched fast path applies."""
        return self.image_size is None and self.augment == "none"

    def output_shape(self, image_shape: tuple[int | None, ...]) -> tuple[int, int, int]:
        """The model's input shape for images of `image_shape` (None = variable)."""
        channels = image_shape[-1]
        if self.image_size is not None:
            return (self.image_size, self.image_size, channels)
        if None in image_shape:
            raise ConfigError(
                f"the images have variable size {image_shape}; set --config.dataset.image_size "
                "(e.g. 224) so they are cropped and resized to one size"
            )
        return tuple(image_shape)

    def train_example(self, image: tf.Tensor, position: tf.Tensor, seed: int) -> tf.Tensor:
        """A uint8 [H, W, C] image -> the float32 model input for stream `position`."""
        if self.augment == "inception_crop":
            crop_seed, flip_seed = tf.unstack(
                tf.random.experimental.stateless_split(
                    tf.stack([tf.constant(seed, tf.int64), position]), num=2
                )
            )
            image = _random_resized_crop(image, self.image_size, crop_seed)
            return normalize(tf.image.stateless_random_flip_left_right(image, flip_seed))
        return self.eval_example(image)

    def eval_example(self, image: tf.Tensor) -> tf.Tensor:
        if self.image_size is None:
            return normalize(image)
        return normalize(_center_crop(image, self.image_size, self.center_crop_fraction))


def from_config(config: ml_collections.ConfigDict) -> Preprocessing:
    """Validates `config.dataset`'s image fields, naming the field and the fix."""
    if config.augment not in AUGMENTATIONS:
        raise ConfigError(
            f"dataset.augment ({config.augment!r}) is not one of {', '.join(AUGMENTATIONS)}"
        )
    if config.image_size is not None and config.image_size <= 0:
        raise ConfigError(f"dataset.image_size ({config.image_size}) must be positive or None")
    if config.augment == "inception_crop" and config.image_size is None:
        raise ConfigError(
            "dataset.augment='inception_crop' resizes its crops to dataset.image_size; "
            "set --config.dataset.image_size (e.g. 224)"
        )
    if not 0 < config.center_crop_fraction <= 1:
        raise ConfigError(
            f"dataset.center_crop_fraction ({config.center_crop_fraction}) must be in (0, 1]"
        )
    return Preprocessing(config.image_size, config.augment, config.center_crop_fraction)


def normalize(images: tf.Tensor) -> tf.Tensor:
    """uint8 (or float in [0, 255]) pixels -> float32 in [-1, 1]."""
    return tf.cast(images, tf.float32) * (2.0 / 255.0) - 1.0


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    # Bilinear on the crop, rounded back to [0, 255]: what the model sees does not depend on
    # whether the input was uint8 or float, and the fast path's normalize applies unchanged.
    resized = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.clip_by_value(tf.round(resized), 0.0, 255.0)


def _random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return _resize(tf.slice(image, begin, crop_size), size)


def _center_crop(image: tf.Tensor, size: int, fraction: float) -> tf.Tensor:
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.maximum(
        tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * fraction, tf.int32), 1
    )
    top, left = (height - side) // 2, (width - side) // 2
    return _resize(image[top : top + side, left : left + side], size)

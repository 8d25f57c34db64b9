"""Classification models chosen by name, from a small MLP to ResNet-50."""

import math
from collections.abc import Callable

import keras
import ml_collections
import tensorflow as tf

from trainer.errors import ConfigError


def _mlp(config: ml_collections.ConfigDict, inputs: keras.KerasTensor) -> keras.KerasTensor:
    x = keras.layers.Flatten()(inputs)
    for _ in range(2):
        x = keras.layers.Dense(config.width * 8, activation="relu")(x)
    return x


def _small_cnn(config: ml_collections.ConfigDict, inputs: keras.KerasTensor) -> keras.KerasTensor:
    """Conv-conv-pool-conv-pool-dense. A dense head, not global pooling: on the shapes data it
    reaches 95% in 200 steps where a pooled head sat at chance for 150 (where is the shape?)."""
    x = keras.layers.Conv2D(config.width, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(config.width, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(config.width * 2, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    return keras.layers.Dense(config.width * 4, activation="relu")(x)


def _batch_norm(
    config: ml_collections.ConfigDict, *, closes_residual: bool = False, name: str | None = None
) -> keras.layers.BatchNormalization:
    """BatchNormalization with the model's momentum and epsilon.

    Keras's momentum convention: moving = momentum * moving + (1 - momentum) * batch, the same as
    Caffe2's SpatialBN (Goyal et al.'s framework; its ResNet builder uses momentum 0.9 and epsilon
    1e-5). PyTorch's momentum is the other way round: its 0.1 is 0.9 here.
    closes_residual: the last BN of a residual branch; with `model.zero_init_residual` its gamma
    starts at 0, so every block starts as the identity (Goyal et al. 2017).
    """
    zero = closes_residual and config.zero_init_residual
    return keras.layers.BatchNormalization(
        momentum=config.bn_momentum,
        epsilon=config.bn_epsilon,
        gamma_initializer="zeros" if zero else "ones",
        name=name,
    )


def _residual_block(
    config: ml_collections.ConfigDict, x: keras.KerasTensor, filters: int, stride: int
) -> keras.KerasTensor:
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = _batch_norm(config)(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = _batch_norm(config, closes_residual=True)(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = _batch_norm(config)(shortcut)
    return keras.layers.ReLU()(y + shortcut)


def _resnet_cifar(
    config: ml_collections.ConfigDict, inputs: keras.KerasTensor
) -> keras.KerasTensor:
    """A ResNet-8-style network for 32x32 inputs: three stages of one residual block."""
    x = keras.layers.Conv2D(config.width, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(_batch_norm(config)(x))
    for stage, multiplier in enumerate((1, 2, 4)):
        x = _residual_block(config, x, config.width * multiplier, stride=1 if stage == 0 else 2)
    return keras.layers.GlobalAveragePooling2D()(x)


def _he_fan_out() -> keras.initializers.Initializer:
    """He et al. 2015 initialisation as torchvision's ResNets use it (kaiming_normal_, fan_out)."""
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal"
    )


def _conv(
    x: keras.KerasTensor, filters: int, kernel: int, name: str, stride: int = 1
) -> keras.KerasTensor:
    """A bias-free convolution (a BN follows). Strided ones pad kernel // 2 on every side, as
    Caffe2 and Model Garden do: "same" pads (0, 1) for an even input and stride 2."""
    padding = "same"
    if stride > 1:
        if kernel > 1:
            x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    return keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding=padding,
        use_bias=False,
        kernel_initializer=_he_fan_out(),
        name=name,
    )(x)


def _bottleneck(
    config: ml_collections.ConfigDict,
    x: keras.KerasTensor,
    filters: int,
    stride: int,
    name: str,
) -> keras.KerasTensor:
    """1x1 -> 3x3 (strided) -> 1x1 x4 channels; a projection shortcut where the shape changes."""
    y = _conv(x, filters, 1, f"{name}_1_conv")
    y = keras.layers.ReLU(name=f"{name}_1_relu")(_batch_norm(config, name=f"{name}_1_bn")(y))
    y = _conv(y, filters, 3, f"{name}_2_conv", stride)
    y = keras.layers.ReLU(name=f"{name}_2_relu")(_batch_norm(config, name=f"{name}_2_bn")(y))
    y = _conv(y, 4 * filters, 1, f"{name}_3_conv")
    y = _batch_norm(config, closes_residual=True, name=f"{name}_3_bn")(y)
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * filters:
        shortcut = _conv(x, 4 * filters, 1, f"{name}_0_conv", stride)
        shortcut = _batch_norm(config, name=f"{name}_0_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _resnet50(config: ml_collections.ConfigDict, inputs: keras.KerasTensor) -> keras.KerasTensor:
    """ResNet-50 v1.5: the stride of a downsampling block is on its 3x3 convolution, not on the
    first 1x1, as in Caffe2's ResNet builder that Goyal et al. 2017 trained with
    (caffe2/python/models/resnet.py), torchvision and Model Garden. No conv biases. Fixed width:
    `model.width` is not read. 25,557,032 trainable parameters with a 1000-class classifier, as
    torchvision's resnet50.
    """
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = keras.layers.Conv2D(
        64, 7, strides=2, use_bias=False, kernel_initializer=_he_fan_out(), name="conv1_conv"
    )(x)
    x = keras.layers.ReLU(name="conv1_relu")(_batch_norm(config, name="conv1_bn")(x))
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (filters, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=2):
        for block in range(1, blocks + 1):
            stride = 2 if block == 1 and stage > 2 else 1
            x = _bottleneck(config, x, filters, stride, name=f"conv{stage}_block{block}")
    return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)


@keras.saving.register_keras_serializable(package="tfscale")
class ReplicaDropout(keras.layers.Dropout):
    """Dropout whose mask differs per replica; Keras 3 Dropout draws the same one on every replica.

    Keras draws the mask from the layer's SeedGenerator state (one [seed, counter] variable,
    mirrored, advanced by 1 per training call on every replica alike), so under MirroredStrategy
    all replicas drop the same features of their different examples: correlated noise, and less
    of it than one device running the global batch. Here the global replica id
    (`replica_id_in_sync_group`, across workers too) is folded into that seed with the stateless
    `fold_in`; replica 0 keeps the seed itself, so one replica (or no strategy) draws exactly the
    masks of `keras.layers.Dropout`. The state is unchanged (still the layer's checkpointed
    SeedGenerator, see `checkpointing.seed_generator_states`), so resume stays exact.

    What equivalence holds with dropout on: the same config on the same replica count is bitwise
    reproducible, with or without an interruption. Across replica counts the examples, global
    batches and dropout rate are the same and masks are independent per example, but not the same
    masks: R and R' replicas give the same training in distribution, not bit for bit (without
    dropout, runs on 1, 2 and 4 replicas agree to float rounding).
    """

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        seed = self.seed_generator.next()  # Advances the shared state, as Keras Dropout does.
        # Keras's conversion of the int64 state to the int32 seed of stateless ops (XLA needs it).
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        context = tf.distribute.get_replica_context()  # None in cross-replica context: replica 0.
        replica = tf.cast(0 if context is None else context.replica_id_in_sync_group, tf.int32)
        seed = tf.where(replica > 0, tf.random.experimental.stateless_fold_in(seed, replica), seed)
        noise_shape = tf.shape(inputs)
        if self.noise_shape is not None:
            noise_shape = tf.stack(
                [noise_shape[i] if d is None else d for i, d in enumerate(self.noise_shape)]
            )
        return tf.nn.experimental.stateless_dropout(
            inputs, rate=self.rate, noise_shape=noise_shape, seed=seed
        )


# Name -> function from (model config, input tensor) to the features the classifier reads.
MODELS: dict[str, Callable[[ml_collections.ConfigDict, keras.KerasTensor], keras.KerasTensor]] = {
    "mlp": _mlp,
    "small_cnn": _small_cnn,
    "resnet_cifar": _resnet_cifar,
    "resnet50": _resnet50,
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates `config.model` at start-up (`config_check.check_config` calls it), before the
    workdir exists; Keras would only fail once the model is built, without naming the field.

    Raises:
      ConfigError: naming the field, its value and the fix.
    """
    if config.name not in MODELS:
        raise ConfigError(f"model.name ({config.name!r}) is not one of {', '.join(MODELS)}")
    width = config.width
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ConfigError(
            f"model.width ({width}) must be a positive integer (channels of the first stage), "
            "e.g. 32"
        )
    rate = config.dropout_rate
    # Also rejects nan: every comparison with nan is False.
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(
            f"model.dropout_rate ({rate}) must be in [0, 1): the fraction of features dropped "
            "before the classifier; 0 = no dropout, e.g. 0.1"
        )
    _check_batch_norm(config)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_batch_norm(config: ml_collections.ConfigDict) -> None:
    momentum, epsilon = config.bn_momentum, config.bn_epsilon
    if not _is_number(momentum) or not 0 <= momentum < 1:
        raise ConfigError(
            f"model.bn_momentum ({momentum}) must be in [0, 1): Keras's convention, moving = "
            "momentum * moving + (1 - momentum) * batch; e.g. 0.9 (Caffe2, Goyal et al.; "
            "PyTorch's 0.1) or 0.99 (Keras's default)"
        )
    if not _is_number(epsilon) or epsilon <= 0:
        raise ConfigError(
            f"model.bn_epsilon ({epsilon}) must be positive; e.g. 1e-5 (Caffe2, Goyal et al.) or "
            "1e-3 (Keras's default)"
        )
    # Like bn_momentum and bn_epsilon, it acts where the model has what it names (a recipe's
    # value stays valid when a smoke test swaps in a small model).
    if not isinstance(config.zero_init_residual, bool):
        raise ConfigError(
            f"model.zero_init_residual ({config.zero_init_residual!r}) must be True or False"
        )


def build_model(
    config: ml_collections.ConfigDict, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> keras.Model:
    """Builds `config.name` with a (dropout +) linear classifier emitting logits.

    Call under `strategy.scope()` so the variables are distributed, with a checked config
    (`config_check.check_config` runs `check_config` once, at start-up). The dropout is
    `ReplicaDropout`: a different mask on every replica.
    """
    inputs = keras.Input(shape=input_shape)
    features = MODELS[config.name](config, inputs)
    if config.dropout_rate > 0:
        features = ReplicaDropout(config.dropout_rate, seed=seed)(features)
    # float32 logits under a mixed policy: the loss and its softmax stay in float32.
    logits = keras.layers.Dense(num_classes, dtype="float32")(features)
    return keras.Model(inputs, logits, name=config.name)

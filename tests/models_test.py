"""Tests for trainer/models.py: builders by name, ResNet options, per-replica dropout, its RNG."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer import checkpointing, models
from trainer.errors import ConfigError

# (input shape, width) per model; resnet50 has a fixed width (not in the width test).
SMALL = {
    "mlp": ((8, 8, 1), 4),
    "small_cnn": ((32, 32, 3), 4),
    "resnet_cifar": ((32, 32, 3), 4),
    "resnet50": ((32, 32, 3), 4),
}


def _model_config(name: str, width: int = 4, dropout_rate: float = 0.0):
    config = default_config.get_config().model
    config.name = name
    config.width = width
    config.dropout_rate = dropout_rate
    return config


def test_every_registered_model_is_tested():
    assert set(models.MODELS) == set(SMALL)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow) if name == "resnet50" else name
        for name in sorted(models.MODELS)
    ],
)
@pytest.mark.parametrize("num_classes", [3, 10])
def test_model_outputs_logits_per_example(name, num_classes):
    input_shape, width = SMALL[name]
    model = models.build_model(_model_config(name, width), input_shape, num_classes, seed=0)
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, *input_shape)).astype(np.float32)
    logits = model(images, training=False)
    assert model.name == name
    assert tuple(logits.shape) == (2, num_classes)
    assert logits.dtype == tf.float32
    assert np.isfinite(logits.numpy()).all()
    # Logits, not probabilities: rows are not normalized, and the last layer is linear.
    assert not np.allclose(logits.numpy().sum(axis=1), 1.0)
    assert model.layers[-1].get_config()["activation"] == "linear"


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet_cifar"])
def test_width_scales_the_model(name):
    input_shape, _ = SMALL[name]
    narrow = models.build_model(_model_config(name, 2), input_shape, 10, seed=0)
    wide = models.build_model(_model_config(name, 4), input_shape, 10, seed=0)
    assert wide.count_params() > narrow.count_params()


def test_same_seed_gives_same_weights_after_keras_seeding():
    def build():
        keras.utils.set_random_seed(1)
        return models.build_model(_model_config("mlp"), (4, 4, 1), 5, seed=0)

    first, second = build(), build()
    for a, b in zip(first.weights, second.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_unknown_model_lists_the_names():
    with pytest.raises(ValueError) as error:
        models.check_config(_model_config("vgg"))
    message = str(error.value)
    assert "'vgg'" in message
    for name in ("mlp", "small_cnn", "resnet_cifar", "resnet50"):
        assert name in message


@pytest.mark.parametrize("name", ["mlp", "resnet_cifar"])
def test_no_dropout_means_no_rng_state(name):
    input_shape, width = SMALL[name]
    model = models.build_model(_model_config(name, width), input_shape, 10, seed=0)
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert checkpointing.seed_generator_states(model) == []


@pytest.mark.parametrize("name, rate", [("mlp", 0.5), ("small_cnn", 0.25)])
def test_dropout_layer_and_its_rng_state_is_checkpointable(name, rate):
    input_shape, width = SMALL[name]
    model = models.build_model(_model_config(name, width, rate), input_shape, 10, seed=3)
    (dropout,) = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropout.rate == rate
    (state,) = checkpointing.seed_generator_states(model)
    assert state is dropout.seed_generator.state.value
    assert isinstance(state, tf.Variable)  # What tf.train.Checkpoint can track.

    # The returned variable *is* the dropout RNG: restoring it replays the same masks.
    images = np.ones((4, *input_shape), np.float32)
    model(images, training=True)
    saved = state.numpy()
    second = model(images, training=True).numpy()
    third = model(images, training=True).numpy()
    assert not np.array_equal(second, third)  # The state advances: a fresh mask each call.
    state.assign(saved)
    np.testing.assert_array_equal(model(images, training=True).numpy(), second)


def test_dropout_seed_sets_the_initial_rng_state():
    def initial_state(seed):
        model = models.build_model(_model_config("mlp", 2, 0.5), (4, 4, 1), 10, seed=seed)
        (state,) = checkpointing.seed_generator_states(model)
        return state.numpy()

    np.testing.assert_array_equal(initial_state(1), initial_state(1))
    assert not np.array_equal(initial_state(1), initial_state(2))


# (model fields, fragments of the error: the field, its value and the fix)
BAD_MODEL_CASES = [
    ({"dropout_rate": 1.5}, ["model.dropout_rate (1.5)", "[0, 1)", "e.g. 0.1"]),
    ({"dropout_rate": 1.0}, ["model.dropout_rate (1.0)", "[0, 1)"]),
    ({"dropout_rate": -0.2}, ["model.dropout_rate (-0.2)", "[0, 1)"]),
    ({"dropout_rate": float("nan")}, ["model.dropout_rate (nan)", "[0, 1)"]),
    ({"width": 0}, ["model.width (0)", "positive integer", "e.g. 32"]),
    ({"width": -4}, ["model.width (-4)", "positive integer"]),
    ({"name": "vgg"}, ["model.name ('vgg')", "mlp, small_cnn, resnet_cifar, resnet50"]),
    ({"bn_momentum": 1.0}, ["model.bn_momentum (1.0)", "[0, 1)", "PyTorch's 0.1"]),
    ({"bn_momentum": -0.1}, ["model.bn_momentum (-0.1)", "[0, 1)"]),
    ({"bn_epsilon": 0.0}, ["model.bn_epsilon (0.0)", "positive", "1e-5"]),
]


@pytest.mark.parametrize(("fields", "fragments"), BAD_MODEL_CASES)
def test_check_config_names_the_field(fields, fragments):
    config = _model_config("mlp")
    for key, value in fields.items():
        config[key] = value
    with pytest.raises(ConfigError) as error:
        models.check_config(config)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.99])
def test_check_config_accepts_dropout_in_range(rate):
    models.check_config(_model_config("small_cnn", width=1, dropout_rate=rate))


def _batch_norms(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def _zero_gammas(model: keras.Model) -> list[str]:
    return [bn.name for bn in _batch_norms(model) if not np.any(bn.gamma.numpy())]


def test_resnet50_is_v1_5_with_the_recipe_options():
    """One build (a few seconds): the parameter count, where the stride is, the BN options."""
    config = _model_config("resnet50")
    config.zero_init_residual = True
    config.bn_momentum, config.bn_epsilon = 0.9, 1e-5
    model = models.build_model(config, (64, 64, 3), 1000, seed=0)
    # torchvision's resnet50 (also v1.5, no conv biases) has exactly this many parameters.
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 25_557_032
    layers = {layer.name: layer for layer in model.layers}
    assert layers["conv3_block1_1_conv"].strides == (1, 1)
    assert layers["conv3_block1_2_conv"].strides == (2, 2)  # v1.5: on the 3x3.
    assert layers["conv3_block1_0_conv"].strides == (2, 2)  # The projection shortcut.
    # gamma = 0 exactly in the last BN of each of the 16 bottleneck blocks, nowhere else.
    expected = [
        f"conv{stage}_block{block}_3_bn"
        for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3))
        for block in range(1, blocks + 1)
    ]
    assert _zero_gammas(model) == expected
    assert {(bn.momentum, bn.epsilon) for bn in _batch_norms(model)} == {(0.9, 1e-5)}


def test_zero_init_residual_is_accepted_and_inert_without_residual_blocks():
    config = _model_config("small_cnn", 2)
    config.zero_init_residual = True
    model = models.build_model(config, (8, 8, 3), 10, seed=0)
    assert not _batch_norms(model)


@pytest.mark.parametrize("zero_init", [False, True])
def test_resnet_cifar_zero_init_residual_makes_each_block_start_as_identity(zero_init):
    config = _model_config("resnet_cifar", 4)
    config.zero_init_residual = zero_init
    model = models.build_model(config, (8, 8, 3), 10, seed=0)
    assert len(_zero_gammas(model)) == (3 if zero_init else 0)  # One per residual block.
    if zero_init:
        # The residual branch adds exactly 0: the first block's output is relu(its input).
        block = model.get_layer(_zero_gammas(model)[0])
        images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
        branch = keras.Model(model.input, block.output)(images, training=False)
        assert not np.any(branch.numpy())


def test_batch_norm_options_reach_every_layer():
    config = _model_config("resnet_cifar", 2)
    config.bn_momentum, config.bn_epsilon = 0.9, 1e-5
    model = models.build_model(config, (8, 8, 3), 10, seed=0)
    assert len(_batch_norms(model)) == 9  # Stem, 2 per block, 2 projection shortcuts.
    assert {(bn.momentum, bn.epsilon) for bn in _batch_norms(model)} == {(0.9, 1e-5)}
    # The Keras convention: after a training call, moving = 0.9 * moving + 0.1 * batch mean.
    bn = _batch_norms(model)[0]
    probe = keras.Model(model.input, bn.input)
    images = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
    batch_mean = probe(images).numpy().mean(axis=(0, 1, 2))
    model(images, training=True)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * batch_mean, rtol=1e-4, atol=1e-7)


# --- per-replica dropout ----------------------------------------------------------------------


def _dropout_model(strategy, seed: int = 3) -> keras.Model:
    with strategy.scope():
        return models.build_model(_model_config("mlp", 2, 0.5), (4, 4, 1), 10, seed=seed)


def _features(model: keras.Model) -> keras.Model:
    """The model up to its dropout output: the masks, where the input is all ones."""
    (dropout,) = [layer for layer in model.layers if isinstance(layer, models.ReplicaDropout)]
    return keras.Model(model.input, dropout.output)


def test_one_replica_draws_keras_dropout_masks():
    """Replica 0 keeps the layer's own seed: without a strategy nothing changes."""
    ours = models.ReplicaDropout(0.5, seed=7)
    theirs = keras.layers.Dropout(0.5, seed=7)
    inputs = np.ones((4, 16), np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(
            ours(inputs, training=True).numpy(), theirs(inputs, training=True).numpy()
        )


def test_masks_differ_per_replica_and_resume_exactly(tmp_path):
    strategy = testutil.mirrored(2)
    model = _dropout_model(strategy)
    features = _features(model)
    (state,) = checkpointing.seed_generator_states(model)
    checkpoint = tf.train.Checkpoint(model=model, rng=[state])
    images = np.ones((4, 4, 4, 1), np.float32)

    @tf.function
    def masks():
        per_replica = strategy.run(lambda: features(images, training=True))
        return strategy.experimental_local_results(per_replica)

    first = [m.numpy() for m in masks()]
    assert not np.array_equal(first[0] != 0, first[1] != 0)  # Different masks per replica...
    assert 0.2 < np.mean(first[0] == 0) < 0.8  # ...each dropping about half the features.
    # The RNG state is one mirrored variable, advanced alike on both replicas.
    states = [s.numpy() for s in strategy.experimental_local_results(state)]
    np.testing.assert_array_equal(states[0], states[1])
    path = checkpoint.write(str(tmp_path / "ckpt"))
    after = [[m.numpy() for m in masks()] for _ in range(2)]
    assert not np.array_equal(after[0][0], after[1][0])  # A fresh mask every step.

    checkpoint.read(path).assert_existing_objects_matched()
    restored = [[m.numpy() for m in masks()] for _ in range(2)]
    for expected, got in zip(after, restored, strict=True):
        for replica in range(2):
            np.testing.assert_array_equal(got[replica], expected[replica])
    assert masks.experimental_get_tracing_count() == 1

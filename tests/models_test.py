"""Tests for trainer/models.py: builders by name, dropout RNG (optimizers: optimizers_test.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

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
        models.build_model(_model_config("vgg"), (8, 8, 1), 10, seed=0)
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


def test_build_model_rejects_bad_dropout_before_keras():
    # Keras' own message ("Expected a float value between 0 and 1") names no config field.
    with pytest.raises(ConfigError, match=r"model\.dropout_rate \(1\.5\)"):
        models.build_model(_model_config("mlp", 2, 1.5), (4, 4, 1), 10, seed=0)

"""Fine-tuning: a fresh run's weights from a tfscale checkpoint, a .keras or a .weights.h5 file."""

import os

import keras
import numpy as np
import pytest
import testutil

from trainer import checkpointing, models
from trainer import setup as setup_lib
from trainer import state as state_lib
from trainer.errors import ConfigError
from trainer.extras import init_checkpoint

SMALL_CNN = ["conv2d", "conv2d_1", "conv2d_2", "dense", "dense_1"]  # dense_1: the classifier.


def _model_config(**fields):
    return testutil.config_with(**{"model.name": "small_cnn", "model.width": 4, **fields})


def _build(num_classes: int, seed: int = 0, **fields) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return models.build_model(_model_config(**fields).model, (32, 32, 3), num_classes, seed=seed)


def _config(source: str, include=(), exclude=()):
    return testutil.config_with(
        init_checkpoint=source, init_checkpoint_include=include, init_checkpoint_exclude=exclude
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A tfscale run's checkpoint (10 classes) and the model it holds."""
    workdir = tmp_path_factory.mktemp("pretrained")
    config = _model_config(**{"distribution.strategy": "default", "dataset.data_dir": data_dir})
    config.seed = 1  # Other weights than a fresh seed-0 model.
    setup = setup_lib.prepare(config)
    state = state_lib.build_state(setup)
    checkpointer = checkpointing.Checkpointer(
        state.checkpoint, str(workdir), is_chief=True, worker_index=0, max_to_keep=3
    )
    checkpointer.save(state_lib.manifest(setup, state))
    return workdir, state.model


def _weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {n: layer.get_weights() for n, layer in init_checkpoint.layer_names(model).items()}


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_layer_names_are_keras_file_names_whatever_the_process_built_before():
    _build(10)  # Moves Keras's global name counters (conv2d_3, dense_2, ...).
    model = _build(10)
    assert model.layers[1].name != "conv2d"
    assert list(init_checkpoint.layer_names(model)) == SMALL_CNN


def test_new_head_loads_the_body_and_reports_what_it_did(pretrained):
    workdir, source = pretrained
    target = _build(num_classes=5)
    fresh_head = target.layers[-1].get_weights()
    report = init_checkpoint.load(target, _config(str(workdir), exclude=("dense_1",)))
    assert report.loaded == SMALL_CNN[:-1]
    assert report.initialized == ["dense_1"]
    assert report.skipped == ["dense_1"]
    assert report.source == os.path.join(workdir, "checkpoints", "ckpt-0")
    expected, loaded = _weights(source), _weights(target)
    for name in SMALL_CNN[:-1]:
        _assert_same(loaded[name], expected[name])
    _assert_same(target.layers[-1].get_weights(), fresh_head)
    assert "loaded: 4 (conv2d, conv2d_1, conv2d_2, dense)" in report.summary()
    assert "newly initialized: 1 (dense_1)" in report.summary()


def test_shape_mismatch_is_one_line_naming_the_layer_and_the_fix(pretrained):
    workdir, _ = pretrained
    with pytest.raises(ConfigError) as error:
        init_checkpoint.load(_build(num_classes=5), _config(str(workdir)))
    message = str(error.value)
    assert "\n" not in message
    assert "dense_1/kernel is [16, 5] here but [16, 10] in the source" in message
    assert "--config.init_checkpoint_exclude='(\"dense_1\",)'" in message


@pytest.mark.parametrize("kind", ["keras", "weights.h5", "prefix"])
def test_every_source_kind_loads_the_same_weights(pretrained, tmp_path, kind):
    workdir, source = pretrained
    path = {
        "keras": str(tmp_path / "model.keras"),
        "weights.h5": str(tmp_path / "model.weights.h5"),
        "prefix": os.path.join(workdir, "checkpoints", "ckpt-0"),
    }[kind]
    if kind == "keras":
        source.save(path)
    elif kind == "weights.h5":
        source.save_weights(path)
    target = _build(num_classes=10, seed=2)
    report = init_checkpoint.load(target, _config(path))
    assert report.loaded == SMALL_CNN and report.initialized == [] and report.skipped == []
    for name, values in _weights(source).items():
        _assert_same(_weights(target)[name], values)


def test_include_loads_only_matching_layers(pretrained):
    workdir, source = pretrained
    target = _build(num_classes=10, seed=2)
    report = init_checkpoint.load(target, _config(str(workdir), include=("conv2d*",)))
    assert report.loaded == ["conv2d", "conv2d_1", "conv2d_2"]
    assert report.initialized == ["dense", "dense_1"]
    _assert_same(target.layers[1].get_weights(), source.layers[1].get_weights())


def test_loads_into_a_mirrored_model_on_every_replica(pretrained):
    workdir, source = pretrained
    strategy = testutil.mirrored(2)
    with strategy.scope():
        target = _build(num_classes=10, seed=2)
    init_checkpoint.load(target, _config(str(workdir)))
    kernel = target.layers[1].weights[0]
    for replica_value in strategy.experimental_local_results(kernel):
        np.testing.assert_array_equal(replica_value.numpy(), source.layers[1].weights[0].numpy())


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"exclude": ("head",)}, "pattern 'head' matches no layer.*layers: conv2d, conv2d_1"),
        ({"include": ("dense_7",)}, "pattern 'dense_7' matches no layer"),
    ],
)
def test_a_pattern_that_matches_nothing_is_an_error(pretrained, fields, error):
    workdir, _ = pretrained
    with pytest.raises(ConfigError, match=error):
        init_checkpoint.load(_build(10), _config(str(workdir), **fields))


def test_a_source_sharing_no_layer_is_an_error(tmp_path):
    mlp = models.build_model(_model_config(**{"model.name": "mlp"}).model, (8,), 3, seed=0)
    path = str(tmp_path / "mlp.weights.h5")
    mlp.save_weights(path)
    conv_only = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(2, 3)])
    with pytest.raises(ConfigError, match="shares no layer with this model"):
        init_checkpoint.load(conv_only, _config(path))


@pytest.mark.parametrize(
    "source, error",
    [
        ("/nowhere/model.keras", "no such file"),
        ("/nowhere/run", "no complete checkpoint in /nowhere/run"),
        ("README.md.h5", "no such file"),
    ],
)
def test_a_missing_source_is_a_config_error(source, error):
    with pytest.raises(ConfigError, match=error):
        init_checkpoint.load(_build(10), _config(source))


def test_a_file_that_is_not_keras_weights_is_a_config_error(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="is not a Keras 3 weights file"):
        init_checkpoint.load(_build(10), _config(str(path)))


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"init_checkpoint_exclude": ("dense_1", 1)}, "must be a tuple of layer-name patterns"),
        ({"init_checkpoint_include": ("",)}, "must be a tuple of layer-name patterns"),
        ({"init_checkpoint_exclude": ("dense_1",)}, "init_checkpoint is ''"),
    ],
)
def test_check_config(fields, error):
    with pytest.raises(ConfigError, match=error):
        init_checkpoint.check_config(testutil.config_with(**fields))


def test_default_config_passes_check_config():
    init_checkpoint.check_config(testutil.config_with())


def test_the_optimizer_is_untouched(pretrained):
    """Only model weights: slots, step and LR state stay those of a fresh run."""
    workdir, _ = pretrained
    target = _build(num_classes=10, seed=2)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(target.trainable_variables)
    init_checkpoint.load(target, _config(str(workdir)))
    assert int(optimizer.iterations.numpy()) == 0
    slots = [v for v in optimizer.variables if "momentum" in v.path]
    assert slots and not any(np.any(v.numpy()) for v in slots)

"""EMA of the weights: the formula in the compiled loop, skipped updates left out, an exact swap
for eval, config checks; end to end, eval and export on the averages and a bitwise resume."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

from trainer import (
    config_check,
    data,
    evaluate,
    export,
    learning_rate,
    loop,
    metrics,
    sources,
    task,
    train,
)
from trainer.errors import ConfigError
from trainer.extras import ema

FEATURES, CLASSES, BATCH = 5, 3, 8


def _split() -> sources.InMemorySplit:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 1, 1, FEATURES), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=64).astype(np.int32)
    return sources.InMemorySplit(images=images, labels=labels)


def _trainer(strategy, decay: float, guard: loop.SpikeGuard | None = None):
    """A linear classifier, plain SGD, its EMA and the compiled loop that updates it."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((1, 1, FEATURES)), keras.layers.Flatten(), keras.layers.Dense(CLASSES)]
        )
        base = learning_rate.WarmupDecaySchedule(
            peak_lr=0.5, total_steps=100, warmup_steps=0, decay_kind="constant"
        )
        schedule = learning_rate.controlled_schedule(base)
        optimizer = keras.optimizers.SGD(schedule)
        optimizer.build(model.trainable_variables)
        average = ema.WeightEMA(model, decay)
    train_loop = loop.make_train_loop(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        global_batch_size=BATCH,
        guard=guard,
        ema=average,
    )
    fn = data.train_dataset_fn(_split(), global_batch_size=BATCH, start_position=0, seed=1)
    iterator = iter(strategy.distribute_datasets_from_function(fn))
    return model, average, train_loop, iterator


def _values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def _replica_values(strategy, variable) -> list[np.ndarray]:
    return [v.numpy() for v in strategy.experimental_local_results(variable)]


def _by_hand(initial: list[np.ndarray], weights_after: list[list[np.ndarray]], decay: float):
    """The module doc's formula over a sequence of weights, in float64."""
    averages = [w.astype(np.float64) for w in initial]
    for n, weights in enumerate(weights_after):
        d = min(decay, (1 + n) / (10 + n))
        averages = [a - (1 - d) * (a - w) for a, w in zip(averages, weights, strict=True)]
    return averages


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_average_after_n_updates_is_the_formula(num_replicas):
    strategy = testutil.mirrored(num_replicas)
    decay = 0.5  # Warm-up decays 0.1, 0.18, ..., then 0.5 from the 9th update on.
    model, average, train_loop, iterator = _trainer(strategy, decay)
    initial = _values(model.trainable_variables)
    weights_after = []
    for _ in range(12):
        train_loop(iterator, tf.constant(1))
        weights_after.append(_values(model.trainable_variables))
    expected = _by_hand(initial, weights_after, decay)
    assert int(average.num_updates.numpy()) == 12
    for variable, want in zip(average.averages, expected, strict=True):
        for on_replica in _replica_values(strategy, variable):  # Every replica's copy.
            np.testing.assert_allclose(on_replica, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(expected[0], weights_after[-1][0])  # It does trail the weights.


def test_a_skipped_update_leaves_the_average_alone():
    strategy = testutil.mirrored(1)
    # sigma = -100: once 2 updates are in the history every update is a "spike", and skipped.
    guard = loop.SpikeGuard(window=8, sigma=-100.0, min_history=2, skip=True)
    _, average, train_loop, iterator = _trainer(strategy, 0.9, guard)
    train_loop(iterator, tf.constant(2))
    after_two = _values(average.averages)
    train_loop(iterator, tf.constant(3))
    assert int(guard.skipped.numpy()) == 3
    assert int(average.num_updates.numpy()) == 2
    for now, then in zip(_values(average.averages), after_two, strict=True):
        np.testing.assert_array_equal(now, then)


def test_applied_swaps_in_the_averages_and_back_exactly():
    strategy = testutil.mirrored(2)
    model, average, train_loop, iterator = _trainer(strategy, 0.9)
    train_loop(iterator, tf.constant(5))
    weights, averages = _values(model.trainable_variables), _values(average.averages)
    with average.applied():
        for inside, want in zip(model.trainable_variables, averages, strict=True):
            for on_replica in _replica_values(strategy, inside.value):
                np.testing.assert_array_equal(on_replica, want)
    for name, values in (("weights", model.trainable_variables), ("averages", average.averages)):
        want = weights if name == "weights" else averages
        for now, then in zip(_values(values), want, strict=True):
            np.testing.assert_array_equal(now, then, err_msg=name)


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"ema_decay": 0.999}, None),
        ({"ema_decay": 1.0}, r"ema_decay \(1.0\) must be in \[0, 1\)"),
        ({"ema_decay": -0.1}, r"ema_decay \(-0.1\) must be in \[0, 1\)"),
        ({"ema_decay": 0.99, "best_metric": "ema_eval_accuracy"}, None),
        ({"ema_decay": 0.99, "lr.plateau_metric": "ema_eval_loss"}, None),
        ({"best_metric": "ema_eval_accuracy"}, "not an eval metric of this run"),
        ({"lr.plateau_metric": "ema_eval_loss"}, "not an eval metric of this run"),
        (
            {"ema_decay": 0.99, "best_metric": "eval_accuracy"},
            "judges the raw weights.*best_metric=ema_eval_accuracy",
        ),
        (
            {"ema_decay": 0.99, "best_metric": "ema_eval_loss", "best_mode": "max"},
            "would keep the worst ema_eval_loss.*best_mode=min",
        ),
    ],
)
def test_check_config(fields, error):
    config = testutil.config_with(**fields)
    if error is None:
        config_check.check_config(config)
    else:
        with pytest.raises(ConfigError, match=error):
            config_check.check_config(config)


# ---------------------------------------------------------------------------------------------
# End to end (in-process, default strategy, a tiny MLP).


def _config(data_dir, **fields):
    return testutil.tiny_run_config(data_dir, **{"ema_decay": 0.9, **fields})


def _saved(workdir, step: int, which: str) -> list[np.ndarray]:
    """A checkpoint's list of variables, in order: "ema/averages" or the model's trainable
    weights, which Keras 3 saves under "optimizer/_trainable_variables"."""
    values = testutil.checkpoint_values(workdir, step)
    count = len([name for name in values if name.startswith(which + "/")])
    return [values[f"{which}/{i}/.ATTRIBUTES/VARIABLE_VALUE"] for i in range(count)]


AVERAGES, WEIGHTS = "ema/averages", "optimizer/_trainable_variables"


@pytest.mark.slow
def test_eval_and_export_use_the_averages(tmp_path, data_dir):
    final_eval = train.train_and_evaluate(_config(data_dir), str(tmp_path))
    evals = [r for r in metrics.read_records(str(tmp_path)) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    for record in evals:
        assert set(task.eval_metric_names(task.metric_names(10), with_ema=True)) <= record.keys()
        assert record["ema_eval_loss"] != record["eval_loss"]  # Two passes, two weight sets.

    directory = tmp_path / "export" / "final"
    assert export.read_info(str(directory))["weights"] == "ema"
    exported = keras.models.load_model(directory / "model.keras").trainable_weights
    averages, weights = _saved(tmp_path, 20, AVERAGES), _saved(tmp_path, 20, WEIGHTS)
    assert len(exported) == len(averages) == len(weights) == 6  # 3 dense layers.
    for exported_weight, average, weight in zip(exported, averages, weights, strict=True):
        np.testing.assert_array_equal(exported_weight.numpy(), average)
        assert not np.array_equal(average, weight)

    # The standalone evaluator restores the same state and gives the same numbers, EMA too.
    step, standalone = evaluate.evaluate_latest(str(tmp_path), strategy="default")
    assert step == 20 and standalone == final_eval


@pytest.mark.slow
def test_fine_tuning_starts_the_averages_at_the_loaded_weights(tmp_path, data_dir):
    train.train_and_evaluate(_config(data_dir, total_steps=5, ema_decay=0.0), str(tmp_path / "a"))
    config = _config(data_dir, total_steps=5, seed=3, init_checkpoint=str(tmp_path / "a"))
    train.train_and_evaluate(config, str(tmp_path / "b"))
    source, start = _saved(tmp_path / "a", 5, WEIGHTS), _saved(tmp_path / "b", 0, WEIGHTS)
    for loaded, weight, average in zip(
        source, start, _saved(tmp_path / "b", 0, AVERAGES), strict=True
    ):
        np.testing.assert_array_equal(weight, loaded)  # Fine-tuning loaded every layer...
        np.testing.assert_array_equal(average, loaded)  # ...and the averages start there.
    updates = testutil.checkpoint_values(tmp_path / "b", 0)[
        "ema/num_updates/.ATTRIBUTES/VARIABLE_VALUE"
    ]
    assert updates == 0


@pytest.mark.slow
def test_resume_with_an_ema_is_bitwise_exact(tmp_path, data_dir, monkeypatch):
    config = _config(data_dir, total_steps=30)
    # Crashes after ckpt-20, resumes there.
    straight, resumed = testutil.straight_and_resumed(config, tmp_path, monkeypatch, 25)
    assert os.path.exists(resumed / "checkpoints" / "ckpt-30.index")
    testutil.assert_bitwise_equal(straight, resumed, 30, has_dropout=False)
    assert len(_saved(resumed, 30, AVERAGES)) == 6  # 3 dense layers' averages.

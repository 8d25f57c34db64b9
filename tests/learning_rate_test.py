"""Tests for trainer/learning_rate.py: hand-computed values, Keras as an oracle, validation,
tracing, and the controlled schedule the optimizer owns."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer.errors import ConfigError
from trainer.learning_rate import (
    DECAY_KINDS,
    WARMUP_KINDS,
    WarmupDecaySchedule,
    check_config,
    scale_learning_rate,
)

# peak 2.0, 10 warmup updates, 100 decay updates (total 110), floor 0.2 where used.
BASE = {"peak_lr": 2.0, "total_steps": 110, "warmup_steps": 10}
COSINE = {**BASE, "decay_kind": "cosine", "end_fraction": 0.1}
LINEAR = {**BASE, "decay_kind": "linear", "end_fraction": 0.1}
POLY = {**BASE, "decay_kind": "polynomial", "end_fraction": 0.1, "power": 2.0}
PIECEWISE = {**BASE, "decay_kind": "piecewise", "boundaries": (50, 80), "multipliers": (0.1, 0.01)}
RSQRT = {**BASE, "decay_kind": "rsqrt"}
EXPO = {
    **BASE,
    "decay_kind": "exponential",
    "decay_rate": 0.5,
    "decay_steps": 10,
    "end_fraction": 0.1,
}
EXP_WARMUP = {**BASE, "warmup_kind": "exponential", "warmup_start_fraction": 0.01}
CONSTANT_WARMUP = {**BASE, "warmup_kind": "constant", "warmup_start_fraction": 0.125}

# (kwargs, step, expected); step is optimizer.iterations, the update applied is u = step + 1.
HAND_CASES = [
    # Linear warmup from 0: u / 10 of the peak, exactly the peak at u = 10, never 0.
    (BASE, 0, 2.0 * 1 / 10),
    (BASE, 4, 2.0 * 5 / 10),
    (BASE, 9, 2.0),
    (BASE, 10, 2.0),
    (BASE, 10_000, 2.0),
    # Linear warmup from 10% of the peak.
    ({**BASE, "warmup_start_fraction": 0.1}, 0, 0.2 + (2.0 - 0.2) * 1 / 10),
    ({**BASE, "warmup_start_fraction": 0.1}, 9, 2.0),
    # Exponential warmup: peak * 0.01 ** (1 - u / 10).
    (EXP_WARMUP, 0, 2.0 * 0.01**0.9),
    (EXP_WARMUP, 4, 2.0 * 0.01**0.5),
    (EXP_WARMUP, 9, 2.0),
    # Constant warmup (Goyal et al.): peak / 8 for updates 1..10, the peak from update 11.
    (CONSTANT_WARMUP, 0, 0.25),
    (CONSTANT_WARMUP, 9, 0.25),
    (CONSTANT_WARMUP, 10, 2.0),
    # No warmup: the first update already uses the peak.
    ({**BASE, "warmup_steps": 0}, 0, 2.0),
    # Cosine: t = (u - 10) / 100.
    (COSINE, 0, 0.2),
    (COSINE, 9, 2.0),
    (COSINE, 34, 0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    (COSINE, 59, 0.2 + 1.8 * 0.5),
    (COSINE, 109, 0.2),
    (COSINE, 500, 0.2),
    # Linear decay.
    (LINEAR, 9, 2.0),
    (LINEAR, 34, 2.0 - 1.8 * 0.25),
    (LINEAR, 59, 2.0 - 1.8 * 0.5),
    (LINEAR, 109, 0.2),
    (LINEAR, 500, 0.2),
    # Polynomial, power 2.
    (POLY, 9, 2.0),
    (POLY, 59, 0.2 + 1.8 * 0.5**2),
    (POLY, 84, 0.2 + 1.8 * 0.25**2),
    (POLY, 109, 0.2),
    (POLY, 500, 0.2),
    # Piecewise: x0.1 from update 51, x0.01 from update 81.
    (PIECEWISE, 0, 0.2),
    (PIECEWISE, 9, 2.0),
    (PIECEWISE, 49, 2.0),
    (PIECEWISE, 50, 0.2),
    (PIECEWISE, 79, 0.2),
    (PIECEWISE, 80, 0.02),
    (PIECEWISE, 500, 0.02),
    # Rsqrt: peak * sqrt(10 / u) after warmup; 1 / sqrt(u) without warmup.
    (RSQRT, 9, 2.0),
    (RSQRT, 39, 2.0 * math.sqrt(10 / 40)),
    (RSQRT, 999, 2.0 * math.sqrt(10 / 1000)),
    ({**RSQRT, "warmup_steps": 0}, 0, 2.0),
    ({**RSQRT, "warmup_steps": 0}, 3, 2.0 / math.sqrt(4)),
    # Exponential: halves every 10 updates after warmup, floored at 0.2.
    (EXPO, 9, 2.0),
    (EXPO, 14, 2.0 * 0.5**0.5),
    (EXPO, 19, 1.0),
    (EXPO, 39, 0.25),
    (EXPO, 49, 0.2),
    (EXPO, 500, 0.2),
    # Constant.
    ({**BASE, "decay_kind": "constant", "warmup_steps": 0}, 500, 2.0),
]


@pytest.mark.parametrize(("kwargs", "step", "expected"), HAND_CASES)
def test_matches_hand_computed_values(kwargs, step, expected):
    np.testing.assert_allclose(WarmupDecaySchedule(**kwargs)(step), expected, rtol=1e-6)


def test_hand_cases_cover_every_kind():
    covered = {kwargs.get("decay_kind", "constant") for kwargs, _, _ in HAND_CASES}
    assert covered == set(DECAY_KINDS)
    assert {kwargs.get("warmup_kind", "linear") for kwargs, _, _ in HAND_CASES} == set(WARMUP_KINDS)


def _keras_curve(schedule, steps):
    # Keras's cosine uses ops.cond, which needs a scalar step: evaluate one step at a time.
    return np.array([float(schedule(s)) for s in steps])


# (our kwargs, Keras schedule, offset, first step): ours(step) == keras(step + 1 - offset) for
# steps from the first step to past total_steps. The + 1 is the u = step + 1 shift. Keras's
# cosine has its own warmup, so it needs no offset; the others have none, so they are compared
# after our warmup only, offset by warmup_steps where their clock starts at the peak.
KERAS_CASES = [
    (
        {**COSINE, "warmup_start_fraction": 0.1},
        keras.optimizers.schedules.CosineDecay(
            0.2, decay_steps=100, alpha=0.1, warmup_target=2.0, warmup_steps=10
        ),
        0,
        0,
    ),
    (
        {**COSINE, "warmup_steps": 0, "end_fraction": 0.0},
        keras.optimizers.schedules.CosineDecay(2.0, decay_steps=110),
        0,
        0,
    ),
    (
        {**POLY, "warmup_steps": 0},
        keras.optimizers.schedules.PolynomialDecay(
            2.0, decay_steps=110, end_learning_rate=0.2, power=2.0
        ),
        0,
        0,
    ),
    (
        POLY,
        keras.optimizers.schedules.PolynomialDecay(
            2.0, decay_steps=100, end_learning_rate=0.2, power=2.0
        ),
        10,
        10,
    ),
    (
        PIECEWISE,
        keras.optimizers.schedules.PiecewiseConstantDecay([50, 80], [2.0, 2.0 * 0.1, 2.0 * 0.01]),
        0,
        10,
    ),
    (
        {**EXPO, "warmup_steps": 0, "end_fraction": 0.0},
        keras.optimizers.schedules.ExponentialDecay(2.0, decay_steps=10, decay_rate=0.5),
        0,
        0,
    ),
    (
        {**EXPO, "end_fraction": 0.0},
        keras.optimizers.schedules.ExponentialDecay(2.0, decay_steps=10, decay_rate=0.5),
        10,
        10,
    ),
]


@pytest.mark.parametrize(("kwargs", "oracle", "offset", "first"), KERAS_CASES)
def test_matches_keras_oracle(kwargs, oracle, offset, first):
    steps = np.arange(first, kwargs["total_steps"] + 20)
    ours = WarmupDecaySchedule(**kwargs)(steps).numpy()
    expected = _keras_curve(oracle, steps + 1 - offset)
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("rule", "factor"), [("linear", 2.0), ("sqrt", math.sqrt(2.0)), ("none", 1.0)]
)
def test_scale_learning_rate_doubled_batch(rule, factor):
    assert scale_learning_rate(0.1, 256, 512, rule) == pytest.approx(0.1 * factor)
    assert scale_learning_rate(0.1, 256, 256, rule) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"scaling": "cubic"}, r"lr\.scaling \('cubic'\).*linear, sqrt, none"),
        ({"base": 0.0}, r"lr\.base \(0\.0\)"),
        ({"base": float("inf")}, r"lr\.base \(inf\) must be a finite number"),
        ({"base": float("nan")}, r"lr\.base \(nan\) must be a finite number"),
        ({"reference_batch_size": 0}, r"lr\.reference_batch_size \(0\)"),
        ({"plateau_min_lr": float("inf")}, r"lr\.plateau_min_lr \(inf\)"),
        ({"milestone_action": "add"}, r"lr\.milestone_action \('add'\).*multiply, set"),
        ({"plateau_mode": "up"}, r"lr\.plateau_mode \('up'\).*min, max"),
        (
            {"milestones": (1, 2), "milestone_values": (0.1, float("nan"))},
            r"lr\.milestone_values \(nan\) must be a finite",
        ),
        (
            {"milestones": (1,), "milestone_values": (-0.1,)},
            r"lr\.milestone_values \(\(-0\.1,\)\) must be positive",
        ),
    ],
)
def test_check_config_errors(fields, match):
    lr = default_config.get_config().lr
    for name, value in fields.items():
        lr[name] = value
    with pytest.raises(ConfigError, match=match):
        check_config(lr)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"warmup_kind": "cosine"}, r"lr\.warmup \('cosine'\).*linear, exponential, constant"),
        ({"decay_kind": "step"}, r"lr\.decay \('step'\).*constant, cosine"),
        ({"peak_lr": 0.0}, r"peak_lr \(0\.0\).*lr\.base"),
        ({"total_steps": 0}, r"total_steps \(0\) must be positive"),
        ({"warmup_steps": -1}, r"lr\.warmup_steps \(-1\)"),
        ({"warmup_steps": 110}, r"lr\.warmup_steps \(110\).*total_steps \(110\).*shorten"),
        ({"warmup_start_fraction": 1.5}, r"lr\.warmup_start_fraction \(1\.5\)"),
        ({"warmup_kind": "exponential"}, r"lr\.warmup_start_fraction \(0\.0\).*exponential"),
        ({"warmup_kind": "constant"}, r"lr\.warmup_start_fraction \(0\.0\).*constant"),
        ({"end_fraction": -0.1}, r"lr\.end_fraction \(-0\.1\)"),
        ({"end_fraction": 1.5}, r"lr\.end_fraction \(1\.5\)"),
        ({"power": 0.0}, r"lr\.power \(0\.0\)"),
        ({"decay_rate": 0.0}, r"lr\.decay_rate \(0\.0\)"),
        ({"decay_rate": 1.5}, r"lr\.decay_rate \(1\.5\)"),
        ({"decay_steps": 0}, r"lr\.decay_steps \(0\)"),
        ({**PIECEWISE, "multipliers": (0.1,)}, r"lr\.boundaries.*lr\.multipliers.*equal length"),
        ({**PIECEWISE, "boundaries": (), "multipliers": ()}, r"lr\.boundaries.*non-empty"),
        ({**PIECEWISE, "boundaries": (80, 50)}, r"lr\.boundaries \(80, 50\).*increasing"),
        ({**PIECEWISE, "boundaries": (50, 50)}, r"lr\.boundaries \(50, 50\).*increasing"),
        ({**PIECEWISE, "boundaries": (10, 80)}, r"lr\.boundaries \(10, 80\).*\(10, 110\]"),
        ({**PIECEWISE, "boundaries": (50, 111)}, r"lr\.boundaries \(50, 111\).*\(10, 110\]"),
    ],
)
def test_validation_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        WarmupDecaySchedule(**{**BASE, **overrides})


def test_piecewise_options_ignored_by_other_decays():
    # Config files keep boundaries/multipliers from a variant; only piecewise reads them.
    schedule = WarmupDecaySchedule(**{**COSINE, "boundaries": (5,), "multipliers": ()})
    assert float(schedule(9)) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs", [COSINE, POLY, PIECEWISE, RSQRT, EXPO, EXP_WARMUP])
def test_config_round_trip(kwargs):
    schedule = WarmupDecaySchedule(**kwargs)
    rebuilt = [
        WarmupDecaySchedule.from_config(schedule.get_config()),
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule)),
    ]
    steps = np.arange(130)
    for other in rebuilt:
        assert isinstance(other, WarmupDecaySchedule)
        assert other.get_config() == schedule.get_config()
        np.testing.assert_array_equal(other(steps), schedule(steps))


@pytest.mark.parametrize("kwargs", [COSINE, PIECEWISE, EXPO, EXP_WARMUP])
def test_vector_call_equals_scalar_calls(kwargs):
    schedule = WarmupDecaySchedule(**kwargs)
    steps = np.arange(130)
    # Vectorised and scalar float32 kernels (pow) may round the last bit differently.
    np.testing.assert_allclose(schedule(steps), [float(schedule(s)) for s in steps], rtol=1e-6)


def test_traces_once_in_tf_function_with_variable_step():
    schedule = WarmupDecaySchedule(**COSINE)
    step = tf.Variable(0, dtype=tf.int64)  # Like optimizer.iterations.
    traces = []

    @tf.function
    def learning_rate():
        traces.append(1)
        return schedule(step)

    for value in (0, 9, 59, 109, 500):
        step.assign(value)
        assert float(learning_rate()) == pytest.approx(float(schedule(value)), rel=1e-6)
    assert len(traces) == 1


@pytest.mark.xla_cpu
def test_compiles_with_xla_in_replica_context():
    # XLA compilation stands in for TPU; strategy.run puts the call in a replica context.
    schedule = WarmupDecaySchedule(**PIECEWISE)
    strategy = testutil.mirrored(2)

    @tf.function(jit_compile=True)
    def learning_rate(step):
        return schedule(step)

    lr = strategy.run(learning_rate, args=(tf.constant(50, tf.int64),))
    assert [float(v) for v in strategy.experimental_local_results(lr)] == pytest.approx([0.2, 0.2])


def test_optimizer_first_update_uses_first_warmup_lr():
    # SGD with gradient 1 moves the variable by exactly the LR of each update: 0.1, 0.2, 0.3.
    schedule = WarmupDecaySchedule(peak_lr=0.3, total_steps=10, warmup_steps=3)
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    var = tf.Variable(0.0)
    moves = []
    for _ in range(4):
        before = float(var)
        optimizer.apply_gradients([(tf.constant(1.0), var)])
        moves.append(before - float(var))
    np.testing.assert_allclose(moves, [0.1, 0.2, 0.3, 0.3], rtol=1e-6)

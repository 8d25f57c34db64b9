"""Tests for trainer/extras/lr_control.py: milestones, plateau, manual override, checkpoints."""

import math
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer import learning_rate, lr_override
from trainer.extras import lr_control

# Base curves with simple closed forms; the schedule is called with `step` = updates applied,
# the update being applied is u = step + 1.
LINEAR = {"peak_lr": 1.0, "total_steps": 100, "decay_kind": "linear"}  # 1 - u / 100.
CONSTANT = {"peak_lr": 1.0, "total_steps": 1000, "decay_kind": "constant"}
# Linear warmup over 20 updates, cosine from 1.0 to 0.1 at update 200.
COSINE = {
    "peak_lr": 1.0,
    "total_steps": 200,
    "warmup_steps": 20,
    "decay_kind": "cosine",
    "end_fraction": 0.1,
}


def _linear_base(step):
    return 1.0 - (step + 1) / 100


def _cosine_base(step):
    u = step + 1
    if u <= 20:
        return u / 20
    t = min((u - 20) / 180, 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _lr_config(**fields):
    config = default_config.get_config().lr
    for name, value in fields.items():
        config[name] = value
    return config


class _States:
    """The schedule's `LRState` and the controller's `ControllerState`, read as one (the tests
    look at both after each decision) and checkpointed as the trainer does, under two names."""

    def __init__(self, lr_state, controller_state):
        self.lr_state, self.lr_control = lr_state, controller_state

    def __getattr__(self, name):
        for part in ("lr_state", "lr_control"):
            if part in self.__dict__ and hasattr(self.__dict__[part], name):
                return getattr(self.__dict__[part], name)
        raise AttributeError(name)


def _build(config, base_kwargs, milestone_steps=(), strategy=None):
    """A fresh state, schedule and controller, as train.py builds them."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        schedule = learning_rate.controlled_schedule(
            learning_rate.WarmupDecaySchedule(**base_kwargs)
        )
        controller_state = lr_control.ControllerState(config.plateau_mode)
    controller = lr_control.LRController(
        config=config,
        milestone_steps=tuple(milestone_steps),
        schedule=schedule,
        state=controller_state,
    )
    return _States(schedule.state, controller_state), schedule, controller


def _multiplier(state):
    return float(state.multiplier.numpy())


# ---------------------------------------------------------------------------------------------
# Milestones

MILESTONES = (10, 20, 30)

# (loop-end steps, events fired at each, multiplier after each, next milestone after each)
MULTIPLY_CASES = [
    ([5, 10, 15, 25, 40], [0, 1, 0, 1, 1], [1.0, 0.5, 0.5, 0.05, 0.01], [10, 20, 20, 30, None]),
    ([35], [3], [0.5 * 0.1 * 0.2], [None]),
    (
        [20, 20, 29, 30, 31],
        [2, 0, 0, 1, 0],
        [0.05, 0.05, 0.05, 0.01, 0.01],
        [30, 30, 30, None, None],
    ),
    ([9], [0], [1.0], [10]),
]


@pytest.mark.parametrize(("loop_ends", "fired", "multipliers", "next_ones"), MULTIPLY_CASES)
def test_multiply_milestones(loop_ends, fired, multipliers, next_ones):
    config = _lr_config(milestone_action="multiply", milestone_values=(0.5, 0.1, 0.2))
    state, _, controller = _build(config, LINEAR, MILESTONES)
    assert controller.next_milestone() == 10
    for step, count, multiplier, next_one in zip(
        loop_ends, fired, multipliers, next_ones, strict=True
    ):
        events = controller.on_loop_end(step)
        assert len(events) == count
        assert _multiplier(state) == pytest.approx(multiplier, rel=1e-6)
        assert controller.next_milestone() == next_one
        for later in (step, step + 3, step + 20):
            expected = multiplier * _linear_base(later)
            assert controller.lr_at(later) == pytest.approx(expected, rel=1e-5, abs=1e-8)


# (loop-end steps, fired at each, (value, anchor step) in force after each: LR(t) for t >= the
# anchor is value * base(t) / base(anchor); None = no change yet)
SET_CASES = [
    ([10, 25, 40], [1, 1, 1], [(0.3, 10), (0.1, 25), (0.05, 40)]),
    ([5, 35], [0, 3], [None, (0.05, 35)]),  # Several at once: in order, so the last one wins.
    ([22, 23, 30], [2, 0, 1], [(0.1, 22), (0.1, 22), (0.05, 30)]),
]


@pytest.mark.parametrize(("loop_ends", "fired", "in_force"), SET_CASES)
def test_set_milestones(loop_ends, fired, in_force):
    config = _lr_config(milestone_action="set", milestone_values=(0.3, 0.1, 0.05))
    _, _, controller = _build(config, LINEAR, MILESTONES)
    for step, count, target in zip(loop_ends, fired, in_force, strict=True):
        events = controller.on_loop_end(step)
        assert len(events) == count
        for later in (step, step + 4, step + 30):
            if target is None:
                expected = _linear_base(later)
            else:
                value, anchor = target
                expected = value * _linear_base(later) / _linear_base(anchor)
            assert controller.lr_at(later) == pytest.approx(expected, rel=1e-5, abs=1e-8)


def test_milestones_fire_in_order_and_once():
    config = _lr_config(milestone_action="multiply", milestone_values=(0.5, 0.1, 0.2))
    state, _, controller = _build(config, LINEAR, MILESTONES)
    events = controller.on_loop_end(50)
    assert [("milestone 1" in e, "milestone 2" in e, "milestone 3" in e) for e in events] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    assert int(state.milestones_done.numpy()) == 3
    assert controller.on_loop_end(60) == []
    assert _multiplier(state) == pytest.approx(0.01, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Reduce on plateau (constant base LR 1.0, so the multiplier is the LR)

# (fields, metric sequence, multiplier after each eval), worked out by hand with Keras
# ReduceLROnPlateau rules: improvement = better than best by more than min_delta; each eval in
# cooldown counts it down and resets wait; otherwise wait += 1 and at patience LR x factor
# (not below min_lr), wait = 0, cooldown starts.
PLATEAU_CASES = [
    pytest.param(
        {"plateau_patience": 2},
        [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8],
        [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25],
        id="min-patience2",
    ),
    pytest.param(
        {"plateau_mode": "max", "plateau_patience": 1, "plateau_cooldown": 2},
        [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7],
        [1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125],
        id="max-cooldown2",
    ),
    pytest.param(
        {"plateau_patience": 2, "plateau_min_delta": 0.25},
        [2.0, 1.875, 1.75, 1.5, 1.5, 1.25, 1.0],
        [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25],
        id="min-delta",
    ),
    pytest.param(
        {"plateau_patience": 1, "plateau_min_lr": 0.375},
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [1, 0.5, 0.375, 0.375, 0.375],
        id="min-lr",
    ),
    pytest.param(
        {
            "plateau_mode": "max",
            "plateau_patience": 3,
            "plateau_cooldown": 1,
            "plateau_min_delta": 0.125,
            "plateau_factor": 0.25,
        },
        [0.5, 0.5, 0.625, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 1.0],
        [1, 1, 1, 1, 1, 1, 0.25, 0.25, 0.25, 0.25],
        id="max-delta-cooldown",
    ),
    # Repeated values that float32 would round up (min) or down (max) are no improvement.
    pytest.param(
        {"plateau_patience": 2},
        [0.3, 0.3, 0.3, 0.1, 0.1, 0.1],
        [1, 1, 0.5, 0.5, 0.5, 0.25],
        id="min-repeated",
    ),
    pytest.param(
        {"plateau_mode": "max", "plateau_patience": 2},
        [0.9, 0.9, 0.9],
        [1, 1, 0.5],
        id="max-repeated",
    ),
]


def _plateau_config(fields):
    return _lr_config(**{"plateau_metric": "eval_loss", "plateau_factor": 0.5, **fields})


@pytest.mark.parametrize(("fields", "metrics", "expected"), PLATEAU_CASES)
def test_reduce_on_plateau(fields, metrics, expected):
    state, _, controller = _build(_plateau_config(fields), CONSTANT)
    previous = 1.0
    for step, (value, multiplier) in enumerate(zip(metrics, expected, strict=True)):
        events = controller.on_eval(step * 10, {"eval_loss": value, "eval_accuracy": 0.5})
        assert _multiplier(state) == pytest.approx(multiplier, rel=1e-6)
        assert controller.lr_at(step * 10) == pytest.approx(multiplier, rel=1e-6)
        assert len(events) == (multiplier != previous)
        previous = multiplier


@pytest.mark.parametrize(("fields", "metrics", "expected"), PLATEAU_CASES)
def test_reduce_on_plateau_agrees_with_keras(fields, metrics, expected):
    config = _plateau_config(fields)
    optimizer = keras.optimizers.SGD(learning_rate=1.0)
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor="eval_loss",
        factor=config.plateau_factor,
        patience=config.plateau_patience,
        mode=config.plateau_mode,
        min_delta=config.plateau_min_delta,
        cooldown=config.plateau_cooldown,
        min_lr=config.plateau_min_lr,
    )
    callback.set_model(types.SimpleNamespace(optimizer=optimizer))
    callback.on_train_begin()
    state, _, controller = _build(config, CONSTANT)
    for epoch, value in enumerate(metrics):
        callback.on_epoch_end(epoch, {"eval_loss": value})
        controller.on_eval(epoch, {"eval_loss": value})
        keras_lr = float(optimizer.learning_rate.numpy())
        assert _multiplier(state) == pytest.approx(keras_lr, rel=1e-6), epoch
    assert keras_lr == pytest.approx(expected[-1], rel=1e-6)


def test_plateau_min_lr_applies_to_the_scheduled_lr():
    # Linear base: 0.5 at step 49. Factor 0.5 would give 0.25, min_lr 0.4 stops it at 0.4.
    config = _plateau_config({"plateau_patience": 1, "plateau_min_lr": 0.4})
    state, _, controller = _build(config, LINEAR)
    controller.on_eval(39, {"eval_loss": 1.0})
    controller.on_eval(49, {"eval_loss": 1.0})
    assert controller.lr_at(49) == pytest.approx(0.4, rel=1e-5)
    assert _multiplier(state) == pytest.approx(0.4 / 0.5, rel=1e-5)
    assert controller.lr_at(59) == pytest.approx(0.8 * _linear_base(59), rel=1e-5)


def test_plateau_disabled_and_unknown_metric():
    state, _, controller = _build(_lr_config(plateau_metric=""), CONSTANT)
    for step in range(5):
        assert controller.on_eval(step, {"eval_loss": 1.0}) == []
    assert _multiplier(state) == 1.0
    _, _, controller = _build(_lr_config(plateau_metric="eval_acc"), CONSTANT)
    with pytest.raises(ValueError, match=r"lr\.plateau_metric \('eval_acc'\).*eval_accuracy"):
        controller.on_eval(0, {"eval_loss": 1.0, "eval_accuracy": 0.5})


# ---------------------------------------------------------------------------------------------
# Manual override (the file protocol is tested in lr_override_test.py, durability in run_test.py)


@pytest.mark.parametrize(
    ("request_", "step", "expected"),
    [
        (("set", 0.01), 40, lambda t: 0.01 * _linear_base(t) / _linear_base(40)),
        (("set", 0.5), 0, lambda t: 0.5 * _linear_base(t) / _linear_base(0)),
        (("multiply", 0.5), 40, lambda t: 0.5 * _linear_base(t)),
        (("multiply", 3), 7, lambda t: 3 * _linear_base(t)),
    ],
)
def test_override(request_, step, expected):
    _, _, controller = _build(_lr_config(), LINEAR)
    assert controller.lr_at(step) == pytest.approx(_linear_base(step), rel=1e-6)
    event = controller.apply_override(lr_override.Request(*request_), step)
    assert "manual override" in event
    for later in (step, step + 10, 90):
        assert controller.lr_at(later) == pytest.approx(expected(later), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Composition with the schedule, step offset


@pytest.mark.parametrize(
    ("target", "set_step", "later_steps"),
    [
        (0.05, 19, [19, 60, 199]),  # Set at the peak.
        (2.0, 100, [100, 101, 150, 199, 300]),  # Set during the decay.
        (0.001, 150, [150, 180, 199]),
    ],
)
def test_set_composes_with_the_schedule(target, set_step, later_steps):
    _, _, controller = _build(_lr_config(), COSINE)
    controller.set(target, set_step, "test")
    assert controller.lr_at(set_step) == pytest.approx(target, rel=1e-5)
    for step in later_steps:
        expected = target * _cosine_base(step) / _cosine_base(set_step)
        assert controller.lr_at(step) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("target", "set_step"), [(0.05, 0), (0.05, 10), (0.5, 18), (3.0, 9)])
def test_set_during_warmup_holds_the_value_then_decays_from_it(target, set_step):
    """ "Set the LR to X" during warmup: X from the next update on, the rest of the ramp skipped,
    then the schedule's decay scaled so that its peak is X; never above X."""
    _, schedule, controller = _build(_lr_config(), COSINE)
    controller.set(target, set_step, "test")
    steps = np.arange(set_step, 220)
    curve = schedule(steps).numpy()
    expected = [target if s < 19 else target * _cosine_base(s) for s in steps]
    np.testing.assert_allclose(curve, expected, rtol=1e-5)
    assert curve.max() <= target * (1 + 1e-6)
    # A later multiply scales the held value and the decay alike.
    controller.scale(0.5, set_step + 1, "test")
    assert controller.lr_at(set_step + 1) == pytest.approx(target / 2, rel=1e-5)
    assert controller.lr_at(100) == pytest.approx(target / 2 * _cosine_base(100), rel=1e-5)


def test_set_where_the_schedule_is_zero_is_refused():
    _, _, controller = _build(_lr_config(), LINEAR)
    with pytest.raises(ValueError, match=r"cannot set the LR to 0\.1 at step 99.*multiplying"):
        controller.set(0.1, 99, "test")


def test_override_set_where_the_schedule_is_zero_is_refused():
    state, _, controller = _build(_lr_config(), LINEAR)
    with pytest.raises(ValueError, match="cannot set the LR"):
        controller.apply_override(lr_override.Request("set", 0.1), 99)
    assert _multiplier(state) == 1.0


@pytest.mark.parametrize("offset", [0, 7, 150])
@pytest.mark.parametrize("multiplier", [1.0, 0.25])
def test_step_offset_shifts_the_schedule(offset, multiplier):
    state, schedule, controller = _build(_lr_config(), COSINE)
    state.step_offset.assign(offset)
    state.multiplier.assign(multiplier)
    steps = np.array([0, 5, 19, 40, 100, 199])
    np.testing.assert_allclose(
        schedule(steps).numpy(),
        [multiplier * _cosine_base(s + offset) for s in steps],
        rtol=1e-5,
    )
    # `set` anchors on the shifted position too.
    controller.set(0.02, 30, "test")
    assert controller.lr_at(30) == pytest.approx(0.02, rel=1e-5)
    assert _multiplier(state) == pytest.approx(0.02 / _cosine_base(30 + offset), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoint / restore, MirroredStrategy

RESTORE_CONFIG = {
    "milestone_action": "multiply",
    "milestone_values": (0.5, 0.8),
    "plateau_metric": "eval_loss",
    "plateau_patience": 2,
    "plateau_cooldown": 1,
    "plateau_min_delta": 0.01,
    "plateau_min_lr": 0.01,
}
RESTORE_MILESTONES = (35, 95)
RESTORE_METRICS = [
    1.0, 0.9, 0.85, 0.85, 0.86, 0.80, 0.80, 0.795, 0.79,
    0.80, 0.81, 0.70, 0.70, 0.71, 0.72, 0.73, 0.74, 0.75,
]  # fmt: skip
SAVE_AFTER = 7  # Evals before the checkpoint; by then wait > 0 and one milestone is done.


def _drive(controller, state, index):
    """One outer-loop boundary: milestones, then eval; returns (multiplier, LR next update)."""
    step = 10 * (index + 1)
    controller.on_loop_end(step)
    controller.on_eval(step, {"eval_loss": RESTORE_METRICS[index]})
    return state.multiplier.numpy(), controller.lr_at(step)


def _variables(state):
    names = (
        "multiplier",
        "step_offset",
        "floor",
        "plateau_best",
        "plateau_wait",
        "plateau_cooldown",
    )
    return {n: getattr(state, n).numpy() for n in (*names, "milestones_done")}


@pytest.mark.parametrize("restore_replicas", [1, 2])
def test_restore_gives_identical_decisions(tmp_path, restore_replicas):
    config = _lr_config(**RESTORE_CONFIG)
    state, _, controller = _build(config, COSINE, RESTORE_MILESTONES)
    state.step_offset.assign(3)
    for index in range(SAVE_AFTER):
        _drive(controller, state, index)
    saved = _variables(state)
    assert saved["milestones_done"] == 1 and saved["plateau_wait"] > 0
    assert saved["multiplier"] < 0.5  # A milestone and at least one plateau reduction.
    path = tf.train.Checkpoint(lr_state=state.lr_state, lr_control=state.lr_control).write(
        str(tmp_path / "ckpt")
    )

    strategy = testutil.mirrored(2) if restore_replicas == 2 else None
    restored_state, _, restored = _build(config, COSINE, RESTORE_MILESTONES, strategy)
    tf.train.Checkpoint(
        lr_state=restored_state.lr_state, lr_control=restored_state.lr_control
    ).read(path).assert_consumed()
    assert _variables(restored_state) == saved
    fresh_state, _, fresh = _build(config, COSINE, RESTORE_MILESTONES)

    original_history, restored_history, fresh_history = [], [], []
    for index in range(SAVE_AFTER, len(RESTORE_METRICS)):
        original_history.append(_drive(controller, state, index))
        restored_history.append(_drive(restored, restored_state, index))
        fresh_history.append(_drive(fresh, fresh_state, index))
        assert restored_history[-1] == original_history[-1], index
        assert _variables(restored_state) == _variables(state), index
    # The restored state is what makes the difference: a fresh controller decides otherwise.
    assert fresh_history != original_history
    multipliers = [m for m, _ in original_history]
    assert len(set(multipliers)) > 1  # Decisions were taken after the restore too.


def test_mirrored_state_is_the_same_on_every_replica(tmp_path):
    strategy = testutil.mirrored(2)
    config = _lr_config(milestone_action="set", milestone_values=(0.2,), plateau_metric="eval_loss")
    state, schedule, controller = _build(config, LINEAR, (10,), strategy)
    assert isinstance(state.multiplier, tf.distribute.DistributedValues)
    controller.on_loop_end(10)
    assert controller.lr_at(10) == pytest.approx(0.2, rel=1e-5)
    for value in (1.0, 1.0, 1.0):  # patience 2: halves on the third eval.
        controller.on_eval(20, {"eval_loss": value})
    controller.apply_override(lr_override.Request("multiply", 0.5), 30)
    expected = 0.2 / _linear_base(10) * 0.5 * 0.5
    assert _multiplier(state) == pytest.approx(expected, rel=1e-5)
    for variable in (state.multiplier, state.plateau_best, state.milestones_done):
        copies = [v.numpy() for v in strategy.experimental_local_results(variable)]
        assert copies[0] == copies[1]

    @tf.function
    def lr_per_replica(step):
        return strategy.run(lambda: schedule(step))

    values = strategy.experimental_local_results(lr_per_replica(tf.constant(30, tf.int64)))
    np.testing.assert_allclose(
        [v.numpy() for v in values], [expected * _linear_base(30)] * 2, rtol=1e-5
    )

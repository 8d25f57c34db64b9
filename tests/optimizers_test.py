"""Tests for trainer/optimizers.py: builders by name, weight decay as l2 or decoupled, momentum
correction and LARS, each checked against updates computed by hand (numpy), on 1 and 2 replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer import config_check, learning_rate, loop, models, optimizers
from trainer.errors import ConfigError
from trainer.learning_rate import WarmupDecaySchedule

FEATURES, CLASSES, BATCH = 4, 3, 8


def _optimizer_config(name: str = "sgd", **overrides):
    config = default_config.get_config().optimizer
    config.name = name
    for key, value in overrides.items():
        config[key] = value
    return config


def _schedule():
    return WarmupDecaySchedule(peak_lr=0.1, total_steps=10, warmup_steps=4, decay_kind="cosine")


def _model_config(name: str = "mlp", width: int = 1):
    config = default_config.get_config().model
    config.name, config.width = name, width
    return config


def _variables():
    model = models.build_model(_model_config(), (2, 2, 1), 3, seed=0)
    return model.trainable_variables


def _linear(strategy=None, seed: int = 0) -> keras.Model:
    """Flatten + Dense: one kernel (decayed by default) and one bias (excluded)."""
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        return keras.Sequential(
            [keras.Input((FEATURES,)), keras.layers.Dense(CLASSES, name="dense")], name="linear"
        )


def _controlled(peak: float = 0.1):
    """A constant LR under LR control: `state.multiplier` is what milestones/plateau/overrides
    change between inner loops."""
    base = WarmupDecaySchedule(peak_lr=peak, total_steps=100)
    return learning_rate.controlled_schedule(base)


# --- building by name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides, optimizer_type, expected",
    [
        ("sgd", {}, optimizers.SGD, {"momentum": 0.9, "nesterov": False}),
        ("sgd", {"momentum": 0.5, "nesterov": True}, optimizers.SGD, {"momentum": 0.5}),
        ("sgd", {"weight_decay": 1e-4}, optimizers.SGD, {"weight_decay": 1e-4}),
        ("sgd", {"momentum_correction": True}, optimizers.SGD, {"momentum_correction": True}),
        ("adam", {}, keras.optimizers.Adam, {"beta_1": 0.9, "beta_2": 0.999}),
        ("adam", {"beta_1": 0.8, "beta_2": 0.95}, keras.optimizers.Adam, {"beta_2": 0.95}),
        ("adamw", {"weight_decay": 0.05}, keras.optimizers.AdamW, {"weight_decay": 0.05}),
        (
            "lars",
            {"weight_decay": 1e-4, "weight_decay_mode": "l2", "lars_trust_coefficient": 0.02},
            optimizers.LARS,
            {"weight_decay_rate": 1e-4, "trust_coefficient": 0.02, "weight_decay": None},
        ),
    ],
)
def test_optimizer_is_built_with_schedule_config_and_slots(
    name, overrides, optimizer_type, expected
):
    schedule = _schedule()
    variables = _variables()
    config = _optimizer_config(name, **overrides)
    optimizer = optimizers.build_optimizer(config, schedule, variables)
    assert type(optimizer) is optimizer_type
    for key, value in expected.items():
        assert getattr(optimizer, key) == pytest.approx(value), key
    # Built now: iterations plus at least one slot per variable, before any step.
    assert optimizer.built
    assert len(optimizer.variables) > len(variables) >= 1
    slot_shapes = sorted(tuple(v.shape) for v in optimizer.variables[1:])
    for variable in variables:
        assert tuple(variable.shape) in slot_shapes
    # The schedule is the LR: schedule(iterations), also after a step.
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(0)))
    before = [v.numpy() for v in variables]
    optimizer.apply_gradients([(tf.ones_like(v), v) for v in variables])
    assert int(optimizer.iterations.numpy()) == 1
    assert float(optimizer.learning_rate) == pytest.approx(float(schedule(1)))
    for old, variable in zip(before, variables, strict=True):
        assert (variable.numpy() < old).all()  # A positive gradient moves every weight down.


def test_sgd_first_step_applies_the_scheduled_lr():
    schedule = _schedule()
    variables = _variables()
    optimizer = optimizers.build_optimizer(_optimizer_config("sgd"), schedule, variables)
    before = [v.numpy() for v in variables]
    optimizer.apply_gradients([(tf.ones_like(v), v) for v in variables])
    lr = float(schedule(0))  # Momentum starts at 0: the first update is -lr * gradient.
    for old, variable in zip(before, variables, strict=True):
        np.testing.assert_allclose(variable.numpy(), old - lr, rtol=1e-6)


def test_optimizer_built_under_mirrored_steps_in_replica_context():
    strategy = testutil.mirrored(2)
    with strategy.scope():
        model = models.build_model(_model_config(), (2, 2, 1), 3, seed=0)
        optimizer = optimizers.build_optimizer(
            _optimizer_config("adam"), _schedule(), model.trainable_variables
        )
    before = [v.numpy() for v in model.trainable_variables]

    @tf.function
    def step():
        def replica_step():
            variables = model.trainable_variables
            optimizer.apply_gradients([(tf.ones_like(v), v) for v in variables])

        strategy.run(replica_step)

    step()
    assert int(optimizer.iterations.numpy()) == 1  # One global step, not one per replica.
    for old, variable in zip(before, model.trainable_variables, strict=True):
        replicas = [v.numpy() for v in strategy.experimental_local_results(variable.value)]
        assert len(replicas) == 2
        np.testing.assert_array_equal(replicas[0], replicas[1])
        assert (replicas[0] < old).all()


def test_optimizers_rebuild_from_their_config():
    for optimizer in (
        optimizers.SGD(0.1, momentum=0.9, momentum_correction=True),
        optimizers.LARS(0.1, momentum=0.8, trust_coefficient=0.01, weight_decay_rate=1e-4),
    ):
        config = keras.optimizers.serialize(optimizer)
        rebuilt = keras.optimizers.deserialize(config)
        assert type(rebuilt) is type(optimizer)
        assert rebuilt.get_config() == optimizer.get_config()


# --- start-up validation ----------------------------------------------------------------------

# (optimizer fields, fragments of the error: the field, its value and the fix)
BAD_CASES = [
    ({"name": "lamb"}, ["optimizer.name ('lamb')", "sgd, adam, adamw, lars"]),
    ({"momentum": 1.5}, ["optimizer.momentum (1.5)", "[0, 1]", "0.9"]),
    ({"beta_2": 1.0}, ["optimizer.beta_2 (1.0)", "[0, 1)", "0.999"]),
    ({"weight_decay": -1e-4}, ["optimizer.weight_decay (-0.0001)", ">= 0"]),
    ({"weight_decay_mode": "l1"}, ["optimizer.weight_decay_mode ('l1')", "l2, decoupled"]),
    ({"weight_decay_exclude": ("bias", "(")}, ["optimizer.weight_decay_exclude", "'('", "regex"]),
    ({"weight_decay_exclude": (1,)}, ["optimizer.weight_decay_exclude ((1,))", "('bias'"]),
    (
        {"name": "adamw", "weight_decay": 0.05, "weight_decay_mode": "l2"},
        ["optimizer.weight_decay_mode ('l2')", "'adamw'", "name='adam'"],
    ),
    (
        {"name": "lars", "weight_decay": 1e-4, "weight_decay_mode": "decoupled"},
        ["optimizer.weight_decay_mode ('decoupled')", "'lars'", "weight_decay_mode='l2'"],
    ),
    (
        {"name": "adam", "momentum_correction": True},
        ["optimizer.momentum_correction (True)", "sgd, lars", "'adam'"],
    ),
    (
        {"momentum": 0.0, "momentum_correction": True},
        ["optimizer.momentum_correction (True)", "momentum > 0", "momentum 0.0"],
    ),
    ({"lars_trust_coefficient": 0.0}, ["optimizer.lars_trust_coefficient (0.0)", "positive"]),
    (
        {"name": "lars", "nesterov": True, "weight_decay_mode": "l2"},
        ["optimizer.nesterov (True)", "'lars'"],
    ),
]


@pytest.mark.parametrize(("fields", "fragments"), BAD_CASES)
def test_check_config_names_the_field_and_config_check_runs_it(fields, fragments):
    config = testutil.config_with(**{f"optimizer.{k}": v for k, v in fields.items()})
    for check in (
        lambda: optimizers.check_config(config.optimizer),
        lambda: config_check.check_config(config),
    ):
        with pytest.raises(ConfigError) as error:
            check()
        for fragment in fragments:
            assert fragment in str(error.value), (fragment, str(error.value))


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "adamw", "weight_decay": 0.0, "weight_decay_mode": "l2"},  # No decay: no clash.
        {"name": "lars", "weight_decay": 1e-4, "weight_decay_mode": "l2"},
        {"name": "sgd", "momentum_correction": True, "nesterov": True},
        {"weight_decay_exclude": ()},
    ],
)
def test_check_config_accepts(fields):
    optimizers.check_config(_optimizer_config(**fields))


# --- which variables decay --------------------------------------------------------------------


@pytest.mark.parametrize(
    "exclude, decayed_suffixes",
    [
        (("bias", "gamma", "beta"), {"kernel"}),  # The default: kernels only.
        ((), {"kernel", "bias", "gamma", "beta"}),
        (("bias", "gamma", "beta", "^dense"), {"kernel"}),  # And not the classifier.
    ],
)
def test_weight_decay_exclude_patterns_select_by_path(exclude, decayed_suffixes):
    model = models.build_model(_model_config("resnet_cifar", 2), (8, 8, 3), 3, seed=0)
    decayed, excluded = optimizers.split_by_weight_decay(model.trainable_variables, exclude)
    assert len(decayed) + len(excluded) == len(model.trainable_variables)
    assert {v.path.rsplit("/", 1)[1] for v in decayed} == decayed_suffixes
    assert any(v.path.startswith("dense") for v in decayed) == ("^dense" not in exclude)


def test_l2_penalty_is_half_wd_times_squared_norm_of_the_kernels_only():
    """Goyal et al./Model Garden: loss 0.5 * wd * ||w||^2, so the gradient is wd * w."""
    wd = 0.1
    model = models.build_model(_model_config("resnet_cifar", 2), (8, 8, 3), 3, seed=0)
    config = _optimizer_config(weight_decay=wd, weight_decay_mode="l2")
    optimizers.build_optimizer(config, 0.1, model.trainable_variables)
    kernels = [v for v in model.trainable_variables if v.path.endswith("/kernel")]
    expected = sum(0.5 * wd * np.sum(k.numpy() ** 2) for k in kernels)
    assert len(model.losses) == len(kernels)
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-5)
    with tf.GradientTape() as tape:
        penalty = tf.add_n(model.losses)
    grads = tape.gradient(penalty, model.trainable_variables)
    for variable, grad in zip(model.trainable_variables, grads, strict=True):
        if variable.path.endswith("/kernel"):
            np.testing.assert_allclose(grad.numpy(), wd * variable.numpy(), rtol=1e-6)
        else:
            assert grad is None  # Biases and BatchNorm gamma/beta: no penalty.
    # Building again in decoupled mode takes the penalty away: no stale loss term.
    optimizers.build_optimizer(_optimizer_config(weight_decay=wd), 0.1, model.trainable_variables)
    assert model.losses == []


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
    return images, labels


def _cross_entropy_grads(kernel, bias, images, labels):
    """d(mean cross-entropy)/d(kernel, bias) of a linear model, by hand."""
    logits = images @ kernel + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    probs[np.arange(len(labels)), labels] -= 1.0
    return images.T @ probs / len(labels), probs.mean(axis=0)


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
@pytest.mark.parametrize("num_replicas", [1, 2])
def test_weight_decay_update_through_the_training_loop(mode, num_replicas):
    """The first update of the real inner loop, against the hand-computed one.

    l2: the penalty is in the loss: w1 = w0 - lr * (g + wd * w0) for the kernel.
    decoupled: Keras decays first: w1 = w0 - lr * wd * w0 - lr * g.
    The bias is excluded in both modes: b1 = b0 - lr * g_b.
    """
    lr, wd = 0.1, 0.05
    strategy = testutil.mirrored(num_replicas)
    model = _linear(strategy)
    with strategy.scope():
        optimizer = optimizers.build_optimizer(
            _optimizer_config(weight_decay=wd, weight_decay_mode=mode),
            lr,
            model.trainable_variables,
        )
    assert bool(model.losses) == (mode == "l2")
    kernel, bias = (v.numpy() for v in model.trainable_variables)
    images, labels = _data()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(BATCH)
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    train_loop = loop.make_train_loop(
        strategy=strategy, model=model, optimizer=optimizer, global_batch_size=BATCH
    )
    outputs = train_loop(iterator, tf.constant(1))

    g_kernel, g_bias = _cross_entropy_grads(kernel, bias, images, labels)
    expected_kernel = kernel - lr * (g_kernel + wd * kernel)  # The same for both modes at step 1.
    np.testing.assert_allclose(model.layers[-1].kernel.numpy(), expected_kernel, rtol=1e-5)
    np.testing.assert_allclose(model.layers[-1].bias.numpy(), bias - lr * g_bias, rtol=1e-5)
    if mode == "l2":  # The logged loss includes the penalty, as Model Garden's does.
        logits = images @ kernel + bias
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        expected_loss = -log_probs[np.arange(BATCH), labels].mean() + 0.5 * wd * np.sum(kernel**2)
        assert float(outputs["loss"].numpy()) == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_l2_goes_through_momentum_and_decoupled_does_not(num_replicas):
    """Second update with momentum m, gradient 0 from the loss (a zero input), weights w0:
    l2: v1 = -lr wd w0, w1 = w0 + v1; v2 = m v1 - lr wd w1, w2 = w1 + v2 (the decay is carried).
    decoupled: w1 = w0 (1 - lr wd); w2 = w1 (1 - lr wd) (momentum never sees it)."""
    lr, wd, m = 0.1, 0.5, 0.9
    results = {}
    for mode in ("l2", "decoupled"):
        strategy = testutil.mirrored(num_replicas)
        model = _linear(strategy)
        with strategy.scope():
            optimizer = optimizers.build_optimizer(
                _optimizer_config(weight_decay=wd, weight_decay_mode=mode, momentum=m),
                lr,
                model.trainable_variables,
            )
        w0 = model.layers[-1].kernel.numpy()
        images = np.zeros((BATCH, FEATURES), np.float32)  # No data gradient on the kernel.
        labels = np.zeros(BATCH, np.int32)
        dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(BATCH)
        train_loop = loop.make_train_loop(
            strategy=strategy, model=model, optimizer=optimizer, global_batch_size=BATCH
        )
        train_loop(iter(strategy.experimental_distribute_dataset(dataset)), tf.constant(2))
        results[mode] = (w0, model.layers[-1].kernel.numpy())
    w0, w2 = results["l2"]
    v1 = -lr * wd * w0
    w1 = w0 + v1
    np.testing.assert_allclose(w2, w1 + m * v1 - lr * wd * w1, rtol=1e-5)
    w0, w2 = results["decoupled"]
    np.testing.assert_allclose(w2, w0 * (1 - lr * wd) ** 2, rtol=1e-5)


# --- momentum correction ----------------------------------------------------------------------


def _replica_step(strategy, optimizer, variables):
    """A compiled update: every replica contributes gradient / replicas, the sum is `gradient`."""

    @tf.function
    def step(gradients):
        def replica_step(gradients):
            scale = 1.0 / strategy.num_replicas_in_sync
            optimizer.apply_gradients(
                [(g * scale, v) for g, v in zip(gradients, variables, strict=True)]
            )

        strategy.run(replica_step, args=(gradients,))

    return step


def _momentum_run(strategy, multipliers, gradients, *, correction, momentum=0.9, nesterov=False):
    """Applies `gradients[t]` with LR 0.1 * multipliers[t] (set like a milestone/plateau/override
    would: the LRState multiplier between updates); returns the weights after each update."""
    schedule = _controlled(0.1)
    with strategy.scope():
        weights = keras.Variable(np.ones(3, np.float32), name="w")
        optimizer = optimizers.SGD(
            schedule, momentum=momentum, nesterov=nesterov, momentum_correction=correction
        )
        optimizer.build([weights])
    step = _replica_step(strategy, optimizer, [weights])
    history = []
    for multiplier, gradient in zip(multipliers, gradients, strict=True):
        schedule.state.multiplier.assign(multiplier)
        step([tf.constant(gradient, tf.float32)])
        history.append(weights.numpy().copy())
    assert step.experimental_get_tracing_count() == 1  # LR changes do not retrace.
    return history, optimizer


MULTIPLIERS = [1.0, 1.0, 0.1, 0.1, 2.0, 0.5]  # A drop (a boundary) and a rise (an override).
GRADIENTS = [np.array([1.0, -2.0, 0.5]) * (t + 1) for t in range(len(MULTIPLIERS))]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("num_replicas", [1, 2])
def test_momentum_correction_gives_the_lr_outside_the_velocity(num_replicas, nesterov):
    """Corrected Keras SGD == b = m b + g; w -= lr_t b (Goyal et al. eq. (9)) at every update,
    so the first update after an LR change already uses the new LR."""
    m = 0.9
    history, _ = _momentum_run(
        testutil.mirrored(num_replicas), MULTIPLIERS, GRADIENTS, correction=True, nesterov=nesterov
    )
    w, b = np.ones(3), np.zeros(3)
    for t, (multiplier, g) in enumerate(zip(MULTIPLIERS, GRADIENTS, strict=True)):
        lr = 0.1 * multiplier
        b = m * b + g
        w = w - lr * ((g + m * b) if nesterov else b)  # PyTorch's Nesterov form.
        np.testing.assert_allclose(history[t], w, rtol=1e-5, err_msg=f"update {t + 1}")


def test_first_update_after_an_lr_change_is_the_corrected_one():
    """By hand, Keras's form: v <- (lr_new / lr_old) v, then v = m v - lr_new g; w += v."""
    m, g = 0.9, GRADIENTS[0]
    history, optimizer = _momentum_run(
        tf.distribute.get_strategy(), [1.0, 0.1], [g, g], correction=True
    )
    v1 = -0.1 * g
    expected = 1.0 + v1 + (m * (0.01 / 0.1) * v1 - 0.01 * g)
    np.testing.assert_allclose(history[1], expected, rtol=1e-6)
    assert float(optimizer.previous_learning_rates[0].numpy()) == pytest.approx(0.01)
    # Uncorrected, the old LR still acts through v: w2 = w1 + m v1 - 0.01 g.
    plain, _ = _momentum_run(tf.distribute.get_strategy(), [1.0, 0.1], [g, g], correction=False)
    np.testing.assert_allclose(plain[1], 1.0 + v1 + (m * v1 - 0.01 * g), rtol=1e-6)


@pytest.mark.parametrize(
    "correction, multipliers",
    [(False, MULTIPLIERS), (True, [1.0] * len(MULTIPLIERS))],
    ids=["off", "on-constant-lr"],
)
def test_without_an_effect_it_is_bitwise_keras_sgd(correction, multipliers):
    """Off: exactly Keras SGD, whatever the LR does. On, at a constant LR: the ratio is exactly 1
    (the same bits)."""
    ours, _ = _momentum_run(
        tf.distribute.get_strategy(), multipliers, GRADIENTS, correction=correction
    )
    schedule = _controlled(0.1)
    weights = keras.Variable(np.ones(3, np.float32))
    keras_sgd = keras.optimizers.SGD(schedule, momentum=0.9)
    keras_sgd.build([weights])
    for t, (multiplier, gradient) in enumerate(zip(multipliers, GRADIENTS, strict=True)):
        schedule.state.multiplier.assign(multiplier)
        keras_sgd.apply_gradients([(tf.constant(gradient, tf.float32), weights)])
        np.testing.assert_array_equal(ours[t], weights.numpy(), err_msg=f"update {t + 1}")


def test_previous_lr_survives_a_checkpoint_round_trip(tmp_path):
    """Resume: the restored optimizer continues bitwise as the uninterrupted one, and the
    previous-LR variables are checkpointed (a fresh optimizer would not correct the first step)."""

    def build():
        schedule = _controlled(0.1)
        weights = keras.Variable(np.ones(3, np.float32), name="w")
        optimizer = optimizers.SGD(schedule, momentum=0.9, momentum_correction=True)
        optimizer.build([weights])
        checkpoint = tf.train.Checkpoint(
            weights=weights, optimizer=optimizer, lr_state=schedule.state
        )
        return schedule, weights, optimizer, checkpoint

    def update(schedule, weights, optimizer, multiplier, gradient):
        schedule.state.multiplier.assign(multiplier)
        optimizer.apply_gradients([(tf.constant(gradient, tf.float32), weights)])

    schedule, weights, optimizer, checkpoint = build()
    for multiplier, gradient in zip(MULTIPLIERS[:3], GRADIENTS[:3], strict=True):
        update(schedule, weights, optimizer, multiplier, gradient)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    keys = [name for name, _ in tf.train.list_variables(path)]
    assert any("optimizer/_variables" in key for key in keys)
    for multiplier, gradient in zip(MULTIPLIERS[3:], GRADIENTS[3:], strict=True):
        update(schedule, weights, optimizer, multiplier, gradient)
    uninterrupted = weights.numpy()

    schedule, weights, optimizer, checkpoint = build()
    checkpoint.read(path).assert_consumed()
    assert float(optimizer.previous_learning_rates[0].numpy()) == pytest.approx(0.1 * 0.1)
    for multiplier, gradient in zip(MULTIPLIERS[3:], GRADIENTS[3:], strict=True):
        update(schedule, weights, optimizer, multiplier, gradient)
    np.testing.assert_array_equal(weights.numpy(), uninterrupted)


def test_momentum_correction_is_built_from_the_config():
    variables = _variables()
    on = optimizers.build_optimizer(_optimizer_config(momentum_correction=True), 0.1, variables)
    off = optimizers.build_optimizer(_optimizer_config(), 0.1, variables)
    assert len(on.previous_learning_rates) == len(variables)
    assert off.previous_learning_rates == []
    assert len(on.variables) == len(off.variables) + len(variables)


# --- LARS -------------------------------------------------------------------------------------


def _lars_by_hand(kernel, bias, gradients, *, lr, m, eta, wd):
    """You et al. 2017, Algorithm 1, for the kernel; plain momentum SGD for the (excluded) bias."""
    v_kernel, v_bias = np.zeros_like(kernel), np.zeros_like(bias)
    for g_kernel, g_bias in gradients:
        trust = (
            eta * np.linalg.norm(kernel) / (np.linalg.norm(g_kernel) + wd * np.linalg.norm(kernel))
        )
        v_kernel = m * v_kernel - lr * trust * (g_kernel + wd * kernel)
        kernel = kernel + v_kernel
        v_bias = m * v_bias - lr * g_bias
        bias = bias + v_bias
    return kernel, bias


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_lars_matches_the_paper_by_hand(num_replicas):
    lr, m, eta, wd = 0.5, 0.9, 0.02, 0.01
    strategy = testutil.mirrored(num_replicas)
    model = _linear(strategy)
    config = _optimizer_config(
        "lars", momentum=m, lars_trust_coefficient=eta, weight_decay=wd, weight_decay_mode="l2"
    )
    with strategy.scope():
        optimizer = optimizers.build_optimizer(config, lr, model.trainable_variables)
    assert optimizer.adapted == [True, False]  # Kernel adapted and decayed; bias neither.
    assert model.losses == []  # The decay is inside the LARS update, not a loss term.
    kernel, bias = (v.numpy() for v in model.trainable_variables)
    rng = np.random.default_rng(1)
    gradients = [
        (
            rng.normal(size=kernel.shape).astype(np.float32),
            rng.normal(size=bias.shape).astype(np.float32),
        )
        for _ in range(3)
    ]
    step = _replica_step(strategy, optimizer, model.trainable_variables)
    for g_kernel, g_bias in gradients:
        step([tf.constant(g_kernel), tf.constant(g_bias)])
    expected_kernel, expected_bias = _lars_by_hand(
        kernel, bias, gradients, lr=lr, m=m, eta=eta, wd=wd
    )
    np.testing.assert_allclose(model.layers[-1].kernel.numpy(), expected_kernel, rtol=1e-5)
    np.testing.assert_allclose(model.layers[-1].bias.numpy(), expected_bias, rtol=1e-5)
    assert step.experimental_get_tracing_count() == 1


def test_lars_trust_ratio_falls_back_to_1_for_zero_weights():
    """A zero-initialised kernel has ||w|| = 0: the update is plain SGD, not a zero step."""
    weights = keras.Variable(np.zeros(3, np.float32), name="kernel")
    optimizer = optimizers.LARS(0.1, momentum=0.0, trust_coefficient=0.001)
    optimizer.build([weights])
    optimizer.apply_gradients([(tf.constant([1.0, 2.0, 3.0]), weights)])
    np.testing.assert_allclose(weights.numpy(), [-0.1, -0.2, -0.3], rtol=1e-6)


def test_lars_with_momentum_correction_rescales_by_the_global_lr():
    schedule = _controlled(0.1)
    weights = keras.Variable(np.full(3, 2.0, np.float32), name="kernel")
    optimizer = optimizers.LARS(
        schedule, momentum=0.9, trust_coefficient=0.1, momentum_correction=True
    )
    optimizer.build([weights])
    g = np.array([1.0, -1.0, 0.5], np.float32)
    w = weights.numpy().astype(np.float64)
    v = np.zeros(3)
    previous = None
    for multiplier in (1.0, 0.1):
        schedule.state.multiplier.assign(multiplier)
        optimizer.apply_gradients([(tf.constant(g), weights)])
        lr = 0.1 * multiplier
        trust = 0.1 * np.linalg.norm(w) / np.linalg.norm(g)
        ratio = 1.0 if previous is None else lr / previous
        v = 0.9 * ratio * v - lr * trust * g
        w = w + v
        previous = lr
        np.testing.assert_allclose(weights.numpy(), w, rtol=1e-6)

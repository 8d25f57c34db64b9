"""The compiled inner loop: the logged LR is the applied LR, the loss is global, no retracing; the
per-update signals are those of one-update loops; a skipped update changes nothing but the step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer import data, learning_rate, loop, lr_override, precision, sources
from trainer.errors import UserError
from trainer.extras import lr_control

NUM_CLASSES = 3
GLOBAL_BATCH = 8
FEATURES = 5


def _split(num_examples: int = 64) -> sources.InMemorySplit:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_examples, 1, 1, FEATURES), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=num_examples).astype(np.int32)
    return sources.InMemorySplit(images=images, labels=labels)


def _build(
    strategy,
    *,
    zero_init: bool,
    warmup_steps: int = 4,
    clip: float = 0.0,
    momentum: float = 0.0,
    guard: loop.SpikeGuard | None = None,
    jit_compile: bool = False,
    loss_scale=None,
    accumulation_steps: int = 1,
    l2: float = 0.0,
):
    """A linear classifier trained by plain SGD under a controlled warmup schedule."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        initializer = "zeros" if zero_init else "glorot_uniform"
        regularizer = keras.regularizers.L2(l2) if l2 else None
        model = keras.Sequential(
            [
                keras.Input((1, 1, FEATURES)),
                keras.layers.Flatten(),
                keras.layers.Dense(
                    NUM_CLASSES, kernel_initializer=initializer, kernel_regularizer=regularizer
                ),
            ]
        )
        base = learning_rate.WarmupDecaySchedule(
            peak_lr=0.4, total_steps=100, warmup_steps=warmup_steps, decay_kind="cosine"
        )
        schedule = learning_rate.controlled_schedule(base)
        optimizer = keras.optimizers.SGD(schedule, momentum=momentum)
        optimizer.build(model.trainable_variables)
    train_loop = loop.make_train_loop(
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        global_batch_size=GLOBAL_BATCH,
        accumulation_steps=accumulation_steps,
        grad_clip_norm=clip,
        guard=guard,
        jit_compile=jit_compile,
        loss_scale=loss_scale,
    )
    return model, optimizer, schedule.state, schedule, train_loop


def _iterator(strategy, split, start=0, accumulation_steps=1):
    fn = data.train_dataset_fn(
        split,
        global_batch_size=GLOBAL_BATCH,
        start_position=start,
        seed=1,
        accumulation_steps=accumulation_steps,
    )
    return iter(strategy.distribute_datasets_from_function(fn))


def _global_batch(split, start):
    """The preprocessed global batch at stream position `start`, via a 1-replica stream."""
    images, labels = next(_iterator(tf.distribute.get_strategy(), split, start))
    return images.numpy().reshape(GLOBAL_BATCH, -1), labels.numpy()


def _expected_grads(images, labels):
    """d(mean cross-entropy)/d(kernel, bias) of a zero linear model: softmax minus one-hot."""
    residual = np.full((GLOBAL_BATCH, NUM_CLASSES), 1.0 / NUM_CLASSES)
    residual[np.arange(GLOBAL_BATCH), labels] -= 1.0
    return images.T @ residual / GLOBAL_BATCH, residual.mean(axis=0)


def _apply_change(path, controller):
    if path == "milestone":
        controller.scale(0.25, 0, "test milestone")
    elif path == "plateau":
        for loss in (1.0, 1.0, 1.0):  # patience 2: the third eval without improvement reduces.
            controller.on_eval(0, {"eval_loss": loss})
    elif path == "override":
        controller.apply_override(lr_override.Request("set", 0.03), 0)


# Expected LR of update 1: warmup 1/4 of the peak 0.4, times what the path did.
@pytest.mark.parametrize(
    ("path", "expected_lr"),
    [("schedule", 0.1), ("milestone", 0.025), ("plateau", 0.05), ("override", 0.03)],
)
@pytest.mark.parametrize("num_replicas", [1, 2])
def test_logged_lr_is_the_applied_lr(path, expected_lr, num_replicas):
    strategy = testutil.mirrored(num_replicas)
    model, _, state, schedule, train_loop = _build(strategy, zero_init=True)
    lr_config = default_config.get_config().lr
    lr_config.plateau_metric = "eval_loss"
    lr_config.plateau_patience = 2
    with strategy.scope():
        controller_state = lr_control.ControllerState(lr_config.plateau_mode)
    controller = lr_control.LRController(
        config=lr_config, milestone_steps=(), schedule=schedule, state=controller_state
    )
    _apply_change(path, controller)
    split = _split()
    images, labels = _global_batch(split, 0)

    outputs = train_loop(_iterator(strategy, split), tf.constant(1))

    logged = float(outputs["learning_rate"].numpy())
    assert logged == pytest.approx(expected_lr, rel=1e-6)
    kernel_grad, bias_grad = _expected_grads(images, labels)
    kernel, bias = (w.numpy() for w in model.trainable_variables)
    np.testing.assert_allclose(kernel, -logged * kernel_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bias, -logged * bias_grad, rtol=1e-4, atol=1e-6)


def test_same_global_batch_gives_same_losses_and_lrs_on_1_2_4_replicas():
    split = _split()
    histories = {}
    for num_replicas in (1, 2, 4):
        strategy = testutil.mirrored(num_replicas)
        _, _, _, _, train_loop = _build(strategy, zero_init=False, momentum=0.9)
        iterator = _iterator(strategy, split)
        steps = [train_loop(iterator, tf.constant(1)) for _ in range(6)]
        histories[num_replicas] = (
            [float(s["loss"].numpy()) for s in steps],
            [float(s["learning_rate"].numpy()) for s in steps],
        )
    for num_replicas in (2, 4):
        np.testing.assert_allclose(histories[num_replicas][0], histories[1][0], rtol=1e-5)
        assert histories[num_replicas][1] == histories[1][1]
    assert histories[1][1][:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # The warmup, applied.


def test_clipping_uses_the_global_norm_of_the_all_reduced_gradient():
    split = _split()
    updates = {}
    for num_replicas in (1, 2):
        strategy = testutil.mirrored(num_replicas)
        model, _, _, _, train_loop = _build(strategy, zero_init=True, clip=1e-3)
        outputs = train_loop(_iterator(strategy, split), tf.constant(1))
        update = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])
        updates[num_replicas] = update
        # Plain SGD from zero: the update is -lr x (gradient clipped to norm 1e-3).
        lr = float(outputs["learning_rate"].numpy())
        assert np.linalg.norm(update) == pytest.approx(lr * 1e-3, rel=1e-4)
    np.testing.assert_allclose(updates[2], updates[1], rtol=1e-5, atol=1e-9)


def test_each_update_all_reduces_its_gradient_once(monkeypatch):
    """The loop's own all-reduce (for the global norm and clipping) is the only one: the
    optimizer is handed the reduced gradient instead of reducing it again (a second all-reduce
    of the whole gradient per update cost 5% of the throughput on 2 replicas)."""
    strategy = testutil.mirrored(2)
    _, _, _, _, train_loop = _build(strategy, zero_init=True)
    reduced = []
    all_reduce = tf.distribute.ReplicaContext.all_reduce

    def counting_all_reduce(context, reduce_op, value, options=None):
        reduced.append(len(tf.nest.flatten(value)))
        return all_reduce(context, reduce_op, value, options)

    monkeypatch.setattr(tf.distribute.ReplicaContext, "all_reduce", counting_all_reduce)
    train_loop(_iterator(strategy, _split()), tf.constant(1))  # Traced here: one update's graph.
    num_weights = 2  # The Dense kernel and bias; one all-reduce call per replica.
    assert reduced == [num_weights] * 2


def test_a_keras_without_the_reduce_hook_is_refused():
    class Optimizer:  # A stand-in for a Keras whose optimizer lost its private hook.
        pass

    with pytest.raises(UserError, match="install the Keras version pyproject.toml names"):
        loop._hand_reduced_gradients_to(Optimizer())


def test_loop_length_is_a_tensor_so_nothing_retraces():
    strategy = testutil.mirrored(2)
    _, optimizer, _, _, train_loop = _build(strategy, zero_init=False)
    iterator = _iterator(strategy, _split())
    for num_steps in (3, 1, 5):
        train_loop(iterator, tf.constant(num_steps))
    assert train_loop.experimental_get_tracing_count() == 1
    assert int(optimizer.iterations.numpy()) == 9


def test_eval_loop_counts_each_example_once_with_weights():
    strategy = testutil.mirrored(2)
    model, _, _, _, _ = _build(strategy, zero_init=False)  # Losses differ per example.
    split = _split(num_examples=37)  # Not a multiple of the global batch: padding is needed.
    fn, steps = data.eval_dataset_fn(split, global_batch_size=GLOBAL_BATCH)
    eval_loop = loop.make_eval_loop(strategy=strategy, model=model)
    outputs = eval_loop(iter(strategy.distribute_datasets_from_function(fn)), tf.constant(steps))
    # The mean over the 37 real examples, each once; padding (copies of the last) weighs 0.
    logits = model(split.images.astype(np.float32) * (2 / 255) - 1, training=False).numpy()
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_loss = -np.mean(log_probs[np.arange(37), split.labels])
    assert float(outputs["eval_loss"].numpy()) == pytest.approx(expected_loss, rel=1e-5)
    expected_accuracy = np.mean(logits.argmax(-1) == split.labels)
    assert float(outputs["eval_accuracy"].numpy()) == pytest.approx(expected_accuracy, rel=1e-5)


def _signals(outputs) -> dict[str, np.ndarray]:
    steps = outputs["steps"].numpy()
    return {name: steps[:, i] for i, name in enumerate(loop.SIGNALS)}


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_per_update_signals_equal_those_of_one_update_loops(num_replicas):
    split = _split()
    strategy = testutil.mirrored(num_replicas)
    _, _, _, _, train_loop = _build(strategy, zero_init=False, momentum=0.9)
    whole = _signals(train_loop(_iterator(strategy, split), tf.constant(6)))
    strategy = testutil.mirrored(num_replicas)
    model, _, _, _, train_loop = _build(strategy, zero_init=False, momentum=0.9)
    iterator = _iterator(strategy, split)
    single = {name: [] for name in loop.SIGNALS}
    for _ in range(6):
        before = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])
        outputs = train_loop(iterator, tf.constant(1))
        after = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])
        for name, values in _signals(outputs).items():
            single[name].append(values[0])
        assert float(outputs["loss"].numpy()) == single["loss"][-1]
        assert single["param_norm"][-1] == pytest.approx(np.linalg.norm(before), rel=1e-5)
        assert single["update_norm"][-1] == pytest.approx(np.linalg.norm(after - before), rel=1e-4)
    for name in ("loss", "grad_norm", "learning_rate", "param_norm", "update_norm"):
        np.testing.assert_allclose(whole[name], single[name], rtol=1e-5, err_msg=name)
    assert whole["learning_rate"][:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # Every warmup step.
    assert not whole["skipped"].any()


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_grad_norm_is_that_of_the_all_reduced_gradient(num_replicas):
    """Plain SGD from zero weights: the update is -lr x gradient, so its norm is lr x grad_norm,
    and the gradient is the known global one (softmax minus one-hot)."""
    strategy = testutil.mirrored(num_replicas)
    _, _, _, _, train_loop = _build(strategy, zero_init=True)
    split = _split()
    images, labels = _global_batch(split, 0)
    signals = _signals(train_loop(_iterator(strategy, split), tf.constant(1)))
    kernel_grad, bias_grad = _expected_grads(images, labels)
    expected = np.sqrt(np.sum(kernel_grad**2) + np.sum(bias_grad**2))
    assert signals["grad_norm"][0] == pytest.approx(expected, rel=1e-4)
    assert signals["update_norm"][0] == pytest.approx(0.1 * expected, rel=1e-4)
    assert signals["param_norm"][0] == 0.0


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_skip_drops_a_spiking_update_and_only_advances_the_step(num_replicas):
    strategy = testutil.mirrored(num_replicas)
    with strategy.scope():
        guard = loop.SpikeGuard(window=8, sigma=6.0, min_history=4, skip=True)
    model, optimizer, _, _, train_loop = _build(
        strategy, zero_init=False, momentum=0.9, guard=guard
    )
    iterator = _iterator(strategy, _split())
    train_loop(iterator, tf.constant(2))
    # A history of tiny, steady losses and gradient norms: the next real update is a spike.
    guard.losses.assign(tf.fill([8], float(np.log(1e-3))))
    guard.grad_norms.assign(tf.fill([8], float(np.log(1e-3))))
    guard.count.assign(8)
    kept = model.trainable_variables + [v for v in optimizer.variables if "momentum" in v.path]
    assert len(kept) == 4  # Kernel, bias and their momentum.
    state = [v.numpy() for v in kept]
    signals = _signals(train_loop(iterator, tf.constant(1)))
    assert signals["skipped"].tolist() == [1.0]
    assert signals["update_norm"].tolist() == [0.0]
    assert int(optimizer.iterations.numpy()) == 3  # The schedule moves on.
    assert int(guard.skipped.numpy()) == 1
    for before, variable in zip(state, kept, strict=True):
        np.testing.assert_array_equal(before, variable.numpy())  # Weights and momentum.
    # The spike entered the window; later updates are judged against it and applied.
    signals = _signals(train_loop(iterator, tf.constant(2)))
    assert signals["skipped"].tolist() == [0.0, 0.0]
    assert (signals["update_norm"] > 0).all()


@pytest.mark.xla_cpu
@pytest.mark.parametrize("num_replicas", [1, 2])
def test_jit_compile_trains_like_the_graph(num_replicas):
    """XLA fuses and reorders float ops, so equal within float32 round-off, not bitwise."""
    runs = {}
    for jit_compile in (False, True):
        strategy = testutil.mirrored(num_replicas)
        model, _, _, _, train_loop = _build(
            strategy, zero_init=False, momentum=0.9, jit_compile=jit_compile
        )
        signals = _signals(train_loop(_iterator(strategy, _split()), tf.constant(6)))
        runs[jit_compile] = (signals, [w.numpy() for w in model.trainable_variables])
    (graph, graph_weights), (xla, xla_weights) = runs[False], runs[True]
    for name in ("loss", "grad_norm", "update_norm"):
        np.testing.assert_allclose(xla[name], graph[name], rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(xla["learning_rate"], graph["learning_rate"])
    for a, b in zip(xla_weights, graph_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.xla_cpu
def test_xla_error_names_an_op_without_an_xla_kernel_and_leaves_other_errors_alone():
    @tf.function(jit_compile=True)
    def with_a_string_op(x):
        return tf.strings.length(tf.strings.as_string(x))

    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        with_a_string_op(tf.constant([1.0]))
    error = loop.xla_error(raised.value)
    assert str(error) == (
        "jit_compile (True): XLA cannot compile the model's forward/backward pass: its op "
        "AsString has no XLA kernel on XLA_CPU; set --config.jit_compile=False, or replace that "
        "op in the model"
    )
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        tf.reshape(tf.constant([1.0, 2.0]), [3])
    assert loop.xla_error(raised.value) is None


# The largest |difference| of weights seen between accumulated and whole-batch runs was 6e-8
# (float32 sums in another order); the tolerance leaves room for other CPUs.
ACCUMULATION_ATOL = 1e-6


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("num_replicas", [1, 2])
def test_accumulated_micro_batches_update_as_one_global_batch(num_replicas, clip):
    """4 micro-batches of 2 per update (1 per replica on 2) against batches of 8: the same
    weights, momentum, signals and schedule position after 5 updates; an L2 term in the loss
    counts once per update, clipping sees the all-reduced sum of all micro-batches."""
    split = _split()
    runs = {}
    for accumulation_steps in (1, 4):
        strategy = testutil.mirrored(num_replicas)
        model, optimizer, _, _, train_loop = _build(
            strategy,
            zero_init=False,
            momentum=0.9,
            clip=clip,
            accumulation_steps=accumulation_steps,
            l2=0.01,
        )
        iterator = _iterator(strategy, split, accumulation_steps=accumulation_steps)
        outputs = [train_loop(iterator, tf.constant(n)) for n in (3, 2)]
        runs[accumulation_steps] = (
            [v.numpy() for v in model.trainable_variables + optimizer.variables],
            np.concatenate([_signals(o)["learning_rate"] for o in outputs]),
            np.concatenate([o["steps"].numpy() for o in outputs]),
            [float(o["accuracy"].numpy()) for o in outputs],
        )
        assert int(optimizer.iterations.numpy()) == 5  # Once per update, not per micro-batch.
    (whole, whole_lrs, whole_steps, whole_accuracy) = runs[1]
    (accumulated, accumulated_lrs, accumulated_steps, accumulated_accuracy) = runs[4]
    for expected, actual in zip(whole, accumulated, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=ACCUMULATION_ATOL)
    assert accumulated_lrs.tolist() == whole_lrs.tolist()
    assert whole_lrs[:4].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])  # The warmup.
    np.testing.assert_allclose(accumulated_steps, whole_steps, rtol=1e-5)
    assert accumulated_accuracy == whole_accuracy
    if clip:
        assert (whole_steps[:, loop.SIGNALS.index("grad_norm")] > clip).all()  # Clipping acted.


@pytest.mark.parametrize("num_replicas", [1, 2])
def test_float16_overflow_skips_exactly_the_overflowing_updates_everywhere(num_replicas):
    """mixed_float16 with a loss scale forced far too high before update 3: every update whose
    all-reduced gradient overflowed is skipped (weights untouched) and halves the scale, the
    others apply; 1 and 2 replicas decide the same."""
    strategy = testutil.mirrored(num_replicas)
    with precision.policy_scope("mixed_float16"), strategy.scope():
        loss_scale = precision.LossScale(initial_scale=1.0)
    with precision.policy_scope("mixed_float16"):
        model, _, _, _, train_loop = _build(strategy, zero_init=False, loss_scale=loss_scale)
    iterator = _iterator(strategy, _split())
    rows = [_signals(train_loop(iterator, tf.constant(2)))]  # Scale 1: no overflow.
    loss_scale.scale.assign(2.0**40)  # float16 tops out at 65504: this overflows.
    weights = [w.numpy() for w in model.trainable_variables]
    first = _signals(train_loop(iterator, tf.constant(1)))
    assert first["skipped"][0] == 1 and not np.isfinite(first["grad_norm"][0])
    for before, after in zip(weights, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(before, after.numpy())  # Exactly nothing moved.
    assert float(loss_scale.scale.numpy()) == 2.0**39
    rows += [first, _signals(train_loop(iterator, tf.constant(40)))]
    skipped = np.concatenate([r["skipped"] for r in rows])
    overflowed = ~np.isfinite(np.concatenate([r["grad_norm"] for r in rows]))
    np.testing.assert_array_equal(skipped == 1, overflowed)
    assert skipped[-1] == 0  # The scale came down far enough to train again.
    assert float(loss_scale.scale.numpy()) == 2.0 ** (40 - skipped.sum())
    assert int(loss_scale.skipped.numpy()) == skipped.sum()
    update_norm = np.concatenate([r["update_norm"] for r in rows])
    assert (update_norm[skipped == 1] == 0).all() and (update_norm[skipped == 0] > 0).all()


def test_float16_with_its_loss_scale_trains_like_float32():
    """The stand-in for the default-config float16 accuracy run, which a CPU cannot afford
    (float16 is emulated: 150x to 400x float32 per update, benchmarks/RESULTS.md): on 2 replicas, 60
    updates of mixed_float16 at the default initial scale (2^15, nothing overflows) follow the
    float32 losses within float16 round-off, so scaling and unscaling cost no accuracy."""
    strategy = testutil.mirrored(2)
    split = _split()
    _, _, _, _, float32_loop = _build(strategy, zero_init=False)
    float32 = _signals(float32_loop(_iterator(strategy, split), tf.constant(60)))
    with precision.policy_scope("mixed_float16"), strategy.scope():
        loss_scale = precision.LossScale()
    with precision.policy_scope("mixed_float16"):
        _, _, _, _, float16_loop = _build(strategy, zero_init=False, loss_scale=loss_scale)
    float16 = _signals(float16_loop(_iterator(strategy, split), tf.constant(60)))
    assert float16["skipped"].sum() == 0 and float(loss_scale.scale.numpy()) == 2.0**15
    assert float32["loss"][-1] < 0.9 * float32["loss"][0]  # It learned: the match means something.
    np.testing.assert_allclose(float16["loss"], float32["loss"], rtol=2e-3)
    assert not np.array_equal(float16["loss"], float32["loss"])  # float16 really computed them.

"""What nan_injection.py and spike_injection.py share: one update's logits scaled, once.

It wraps the model the compiled train step sees (nothing in the product changes), so the logits
of update N are multiplied by a factor while an `armed` variable is true; the run's recovery
method (NaN recovery, health rollback) disarms it, so the recovered run passes update N cleanly.
In-process tests install it with `monkeypatch.setattr` as `patch` (precision_test's forced
float16 overflow), so it is gone after the test.
"""

from collections.abc import Callable

import tensorflow as tf

from trainer import loop, recovery

# The recovery methods that disarm an injection, by the name `install` takes.
DISARMED_BY = {
    "nan_recovery": (recovery.NonFiniteRecovery, "recover"),
    "rollback": (recovery.Rollback, "roll_back"),
}


class _ScaledLogits:
    """The model, except that its logits are x `factor` in update `update` while `armed`."""

    def __init__(self, model, optimizer, update: int, factor: float, armed: tf.Variable):
        self._model, self._optimizer = model, optimizer
        self._update, self._factor, self._armed = update, factor, armed

    def __call__(self, images, training):
        logits = self._model(images, training=training)
        hit = tf.logical_and(self._armed, tf.equal(self._optimizer.iterations + 1, self._update))
        return logits * tf.where(hit, self._factor, 1.0)

    def __getattr__(self, name):
        return getattr(self._model, name)


def install(
    update: Callable[[], int],
    factor: Callable[[], float],
    disarmed_by: str | None,
    patch: Callable[[object, str, object], None] = setattr,
) -> None:
    """Scales the logits of update `update()` by `factor()` until the recovery named
    `disarmed_by` (a key of DISARMED_BY) decides (never disarmed with None: an update number is
    reached once per run anyway).

    Callables, read when the train loop is built: the harness's flags are parsed after this.
    `patch(module_or_class, name, value)` replaces the product's functions."""
    # The variable, made when the first train loop is built (after the strategy exists: a TF op
    # now would fix the devices) and shared by every later one of the process, so a disarmed
    # injection stays disarmed.
    armed = []
    make_train_loop = loop.make_train_loop

    def injecting_train_loop(*, model, optimizer, **kwargs):
        if not armed:
            armed.append(tf.Variable(True, trainable=False))  # No strategy scope: one host copy.
        wrapped = _ScaledLogits(model, optimizer, update(), factor(), armed[0])
        return make_train_loop(model=wrapped, optimizer=optimizer, **kwargs)

    patch(loop, "make_train_loop", injecting_train_loop)
    if disarmed_by is None:
        return
    owner, method = DISARMED_BY[disarmed_by]
    recover = getattr(owner, method)

    def disarming_recovery(self, *args):
        armed[0].assign(False)
        return recover(self, *args)

    patch(owner, method, disarming_recovery)

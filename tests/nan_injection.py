"""Test harness: `trainer.main` with the loss of one chosen update made NaN, once per process.

  python -m nan_injection --nan_at_update=33 --config=... --workdir=... (run from tests/)

Kept out of the product on purpose: it wraps the model the compiled train step sees, so the
logits of update N are NaN while armed; a NaN recovery disarms it (the recovered run then passes
update N cleanly). The flag is this harness's own, not a config field.
"""

import tensorflow as tf
from absl import flags

from trainer import cli, loop, main
from trainer import run as run_lib

_NAN_AT_UPDATE = flags.DEFINE_integer("nan_at_update", 1, "The update whose loss becomes NaN.")


class _PoisonedModel:
    """The model, except that its logits are NaN in update `update` while `armed`."""

    def __init__(self, model, optimizer, update: int, armed: tf.Variable):
        self._model, self._optimizer, self._update, self._armed = model, optimizer, update, armed

    def __call__(self, images, training):
        logits = self._model(images, training=training)
        hit = tf.logical_and(self._armed, tf.equal(self._optimizer.iterations + 1, self._update))
        return logits * tf.where(hit, float("nan"), 1.0)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _install() -> None:
    armed = []  # The variable, made once the strategy exists (a TF op would fix the devices).
    make_train_loop = loop.make_train_loop

    def poisoned_train_loop(*, model, optimizer, **kwargs):
        armed.append(tf.Variable(True, trainable=False))  # No strategy scope: one host copy.
        poisoned = _PoisonedModel(model, optimizer, _NAN_AT_UPDATE.value, armed[0])
        return make_train_loop(model=poisoned, optimizer=optimizer, **kwargs)

    recover = run_lib.Run.recover_from_non_finite

    def disarming_recover(self, loss):
        armed[0].assign(False)
        return recover(self, loss)

    loop.make_train_loop = poisoned_train_loop
    run_lib.Run.recover_from_non_finite = disarming_recover


if __name__ == "__main__":
    _install()
    cli.run(main.main, "config", "workdir")

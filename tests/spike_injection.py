"""Test harness: `trainer.main` with the loss of one chosen update made to spike, once per process.

  python -m spike_injection --spike_at_update=80 --config=... --workdir=... (run from tests/)

Like nan_injection.py, kept out of the product: it wraps the model the compiled train step sees,
so the logits of update N are multiplied by `--spike_factor` while armed: a confidently wrong
batch, whose loss and gradient norm jump far above their recent history. A health rollback
disarms it (the rolled-back run then passes update N cleanly).
"""

import tensorflow as tf
from absl import flags

from trainer import cli, loop, main
from trainer import run as run_lib

_SPIKE_AT_UPDATE = flags.DEFINE_integer("spike_at_update", 1, "The update whose loss spikes.")
_SPIKE_FACTOR = flags.DEFINE_float("spike_factor", 50.0, "Logits x this in that update.")


class _SpikedModel:
    """The model, except that its logits are scaled by `factor` in update `update` while armed."""

    def __init__(self, model, optimizer, update: int, factor: float, armed: tf.Variable):
        self._model, self._optimizer = model, optimizer
        self._update, self._factor, self._armed = update, factor, armed

    def __call__(self, images, training):
        logits = self._model(images, training=training)
        hit = tf.logical_and(self._armed, tf.equal(self._optimizer.iterations + 1, self._update))
        return logits * tf.where(hit, self._factor, 1.0)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _install() -> None:
    armed = []  # The variable, made once the strategy exists (a TF op would fix the devices).
    make_train_loop = loop.make_train_loop

    def spiked_train_loop(*, model, optimizer, **kwargs):
        armed.append(tf.Variable(True, trainable=False))  # No strategy scope: one host copy.
        spiked = _SpikedModel(
            model, optimizer, _SPIKE_AT_UPDATE.value, _SPIKE_FACTOR.value, armed[0]
        )
        return make_train_loop(model=spiked, optimizer=optimizer, **kwargs)

    roll_back = run_lib.Run.roll_back

    def disarming_roll_back(self, event):
        armed[0].assign(False)
        return roll_back(self, event)

    loop.make_train_loop = spiked_train_loop
    run_lib.Run.roll_back = disarming_roll_back


if __name__ == "__main__":
    _install()
    cli.run(main.main, "config", "workdir")

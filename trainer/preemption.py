"""Turns SIGTERM/SIGINT into "finish this inner loop, checkpoint, exit 42" on every worker.

Why not only tf.distribute.experimental.PreemptionCheckpointHandler: it raises
NotImplementedError on Cloud TPU VMs and saves through its own path, which would skip the manifest
that marks a checkpoint complete. This watcher works on every strategy: the signal handler only
sets a flag (safe at any moment, a second signal during the save changes nothing), and at each
loop boundary the workers agree with one all-reduce (multi-worker only) so all of them save the
same step and exit together.
"""

import signal

import tensorflow as tf
from absl import logging

# Launchers (launch/*.sh) restart a job that exits with this code; TF's own handler uses it too.
EXIT_CODE_PREEMPTED = 42


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; main.py exits with EXIT_CODE_PREEMPTED."""

    def __init__(self, step: int):
        super().__init__(
            f"preempted: checkpoint written at step {step}; rerun the same command to resume"
        )
        self.step = step


class PreemptionWatcher:
    """Records termination signals; `should_stop()` is called between inner loops."""

    def __init__(self, strategy: tf.distribute.Strategy, num_workers: int):
        self._strategy = strategy
        self._num_workers = num_workers
        self._signal = None
        self._previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self._signal is None:
            logging.warning(
                "received %s: saving a checkpoint after the current inner loop, then exiting %d",
                signal.Signals(signum).name,
                EXIT_CODE_PREEMPTED,
            )
        else:
            logging.warning("received %s again: already stopping", signal.Signals(signum).name)
        self._signal = signum

    def should_stop(self) -> bool:
        """True on every worker once any worker got a signal. A collective on multi-worker."""
        local = self._signal is not None
        if self._num_workers == 1:
            return local
        flags = self._strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant(1.0 if local else 0.0)
        )
        return bool(self._strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None).numpy())

    def close(self) -> None:
        """Restores the previous handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def __enter__(self) -> "PreemptionWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Turns SIGTERM/SIGINT into "finish this inner loop, checkpoint, exit 42" on every worker.

Why not only tf.distribute.experimental.PreemptionCheckpointHandler: it raises
NotImplementedError on Cloud TPU VMs and saves through its own path, which would skip the manifest
that marks a checkpoint complete. This works on every strategy: the signal handler only sets a
flag (safe at any moment), and at each loop boundary the workers agree with one all-reduce
(multi-worker only) so all of them save the same step and exit together.

The command-line tool installs the handler before it even imports TensorFlow, so a signal at any
moment (import, set-up, dataset preparation, model build, training) ends in exit 42 once the
state on disk is consistent. The command-line
tool keeps it installed until the process has exited: a second signal, even during interpreter
shutdown, is only logged, so a stop never ends in 143/130 instead of 42.
"""

import contextlib
import signal
from collections.abc import Iterator

from absl import logging

# Launchers (launch/*.sh) restart a job that exits with this code; TF's own handler uses it too.
EXIT_CODE_PREEMPTED = 42
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised once the state on disk is consistent; the CLI exits with EXIT_CODE_PREEMPTED."""

    def __init__(self, step: int | None):
        where = "before training started" if step is None else f"checkpoint at step {step}"
        super().__init__(f"preempted: {where}; rerun the same command to resume")
        self.step = step


class SignalWatcher:
    """Records termination signals from its creation on; `should_stop` is asked between loops."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in _SIGNALS}

    def take_back_handlers(self) -> None:
        """Re-installs the handlers after the strategy is built: TF's coordination service
        (MultiWorkerMirroredStrategy) installs a SIGTERM handler of its own, which would turn a
        preemption into a run that ignores the signal."""
        for signum in _SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.received is None:
            logging.warning(
                "received %s: stopping at the next safe point (after the current inner loop, "
                "with a checkpoint), then exiting %d",
                name,
                EXIT_CODE_PREEMPTED,
            )
            self.received = signum
        else:
            logging.warning("received %s again: already stopping", name)

    def should_stop(self, strategy, num_workers: int) -> bool:
        """True on every worker once any worker got a signal. A collective on multi-worker."""
        local = self.received is not None
        if num_workers == 1:
            return local
        import tensorflow as tf  # Here, not at the top: the CLI imports this before TF loads.

        flags = strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant(1.0 if local else 0.0)
        )
        return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None).numpy())

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


_process_watcher: SignalWatcher | None = None


def install_for_process() -> SignalWatcher:
    """Installs the handlers for the rest of the process (command-line tools call this first)."""
    global _process_watcher
    if _process_watcher is None:
        _process_watcher = SignalWatcher()
    return _process_watcher


def ignore_while_exiting() -> None:
    """Ignores SIGTERM/SIGINT from now on, for a process that is exiting 42.

    Python's finalization puts its own handlers back to the default ones (ignored ones it
    leaves alone), and TF's teardown can take a while: a second signal then would end the
    process as 143/130 instead of 42.
    """
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def watching() -> Iterator[SignalWatcher]:
    """The process's watcher if a command-line tool installed one; else one for this block only
    (library use, tests), whose handlers are restored when the block ends."""
    if _process_watcher is not None:
        yield _process_watcher
        return
    watcher = SignalWatcher()
    try:
        yield watcher
    finally:
        watcher.restore()

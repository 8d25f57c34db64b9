"""Test harness: `trainer.main` that cannot go past a chosen step before it has been signalled.

  python -m hold_for_signal --hold_at_step=40 --config=... --workdir=...
  (from the repository root, tests/ on PYTHONPATH)

A test that signals a running trainer once it has logged step N races the end of the run: on a
loaded 2-core machine the remaining steps can finish before the signal arrives, and the run
exits 0 instead of 42. Here the train-loop call that reaches `--hold_at_step` or a later step
does not return until the process has received SIGTERM or SIGINT, so the run stops at that
loop boundary at the latest, and the signal lands at a moment the test does not choose (inside
an inner loop, at a boundary, or in the hold). Waiting on the host changes no tensor: the run
stays bitwise comparable with a straight one. Like nan_injection.py, kept out of the product.
"""

import time

from absl import flags

from trainer import cli, loop, main, preemption

_HOLD_AT_STEP = flags.DEFINE_integer(
    "hold_at_step", None, "A train-loop call that reaches this step returns once signalled."
)
_MAX_WAIT_SECONDS = 300


def install() -> None:
    """Makes the train loops of this process hold at `--hold_at_step` (no hold without it).

    Installs the process's signal watcher first, as `python -m trainer.main` does: the run and
    the hold then see the same signals."""
    watcher = preemption.install_for_process()
    make_train_loop = loop.make_train_loop

    def holding_make_train_loop(*, optimizer, **kwargs):
        train_loop = make_train_loop(optimizer=optimizer, **kwargs)

        def held_train_loop(iterator, num_steps):
            outputs = train_loop(iterator, num_steps)
            hold = _HOLD_AT_STEP.value
            if hold is not None and int(optimizer.iterations.numpy()) >= hold:
                _wait_for_a_signal(watcher)
            return outputs

        return held_train_loop

    loop.make_train_loop = holding_make_train_loop


def _wait_for_a_signal(watcher: preemption.SignalWatcher) -> None:
    deadline = time.monotonic() + _MAX_WAIT_SECONDS
    while watcher.received is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"hold_for_signal: no signal within {_MAX_WAIT_SECONDS} s")
        time.sleep(0.05)  # A signal interrupts the sleep; its handler sets `received`.


if __name__ == "__main__":
    install()
    cli.run(main.main, "config", "workdir")

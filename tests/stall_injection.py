"""Test harness: `trainer.main` with one train-loop call stalled, once per process.

  python -m stall_injection --stall_at_call=3 --stall_seconds=4 --config=... --workdir=...
  (from the repository root, tests/ on PYTHONPATH)

Like nan_injection.py, kept out of the product: it wraps the compiled train loop the outer loop
calls, so call N (counted from 1) sleeps before it runs, as a worker stuck in its host code would
(a lock, a filesystem call): the watchdog should dump the stacks, and on a multi-worker run the
other workers wait in their collectives. The flags are this harness's own, not config fields.
"""

import time

from absl import flags

from trainer import cli, loop, main

_STALL_AT_CALL = flags.DEFINE_integer("stall_at_call", 3, "The train-loop call that stalls.")
_STALL_SECONDS = flags.DEFINE_float("stall_seconds", 4.0, "How long it stalls.")


def _install() -> None:
    make_train_loop = loop.make_train_loop

    def stalling_make_train_loop(**kwargs):
        train_loop = make_train_loop(**kwargs)
        calls = []

        def stalled_train_loop(iterator, num_steps):
            calls.append(num_steps)
            if len(calls) == _STALL_AT_CALL.value:
                time.sleep(_STALL_SECONDS.value)
            return train_loop(iterator, num_steps)

        return stalled_train_loop

    loop.make_train_loop = stalling_make_train_loop


if __name__ == "__main__":
    _install()
    cli.run(main.main, "config", "workdir")

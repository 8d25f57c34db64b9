"""Test harness: `trainer.main` with the loss of one chosen update made NaN, once per process.

  python -m nan_injection --nan_at_update=33 --config=... --workdir=...
  (from the repository root, tests/ on PYTHONPATH)

Kept out of the product on purpose: the logits of update N are NaN while armed
(logit_injection.py); a NaN recovery disarms it (the recovered run then passes update N
cleanly). The flag is this harness's own, not a config field.
"""

import logit_injection
from absl import flags

from trainer import cli, main

_NAN_AT_UPDATE = flags.DEFINE_integer("nan_at_update", 1, "The update whose loss becomes NaN.")

if __name__ == "__main__":
    logit_injection.install(lambda: _NAN_AT_UPDATE.value, lambda: float("nan"), "nan_recovery")
    cli.run(main.main, "config", "workdir")

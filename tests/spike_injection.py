"""Test harness: `trainer.main` with the loss of one chosen update made to spike, once per process.

  python -m spike_injection --spike_at_update=80 --config=... --workdir=...
  (from the repository root, tests/ on PYTHONPATH)

Like nan_injection.py, kept out of the product: the logits of update N are multiplied by
`--spike_factor` while armed (logit_injection.py), a confidently wrong batch whose loss and
gradient norm jump far above their recent history. A health rollback disarms it (the rolled-back
run then passes update N cleanly).
"""

import hold_for_signal
import logit_injection
from absl import flags

from trainer import cli, main

_SPIKE_AT_UPDATE = flags.DEFINE_integer("spike_at_update", 1, "The update whose loss spikes.")
_SPIKE_FACTOR = flags.DEFINE_float("spike_factor", 50.0, "Logits x this in that update.")

if __name__ == "__main__":
    hold_for_signal.install()  # Its --hold_at_step, for a test that signals the spiked run.
    logit_injection.install(lambda: _SPIKE_AT_UPDATE.value, lambda: _SPIKE_FACTOR.value, "rollback")
    cli.run(main.main, "config", "workdir")

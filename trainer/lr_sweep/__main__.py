"""`python -m trainer.lr_sweep --config=... --workdir=DIR [--lrs=...|--factors=...]`: the flags.

The sweep itself is the package (`__init__.py`). The range test's flags (--min_lr, --max_lr,
--num_steps, --rule) are trainer.lr_find's, used when the sweep runs the range test itself.
"""

import os

from absl import flags, logging

from trainer import cli, lr_find, lr_sweep

_LRS = flags.DEFINE_list("lrs", [], "Values of lr.base to try; [] = --factors x lr_find's pick.")
_FACTORS = flags.DEFINE_list(
    "factors",
    [f"{f:g}" for f in lr_sweep.DEFAULT_FACTORS],
    "Multiples of the range test's suggested lr.base to try (without --lrs).",
)
_TRIAL_STEPS = flags.DEFINE_integer(
    "trial_steps",
    0,
    "Updates per trial; 0 = the warmup plus two health.trend_window (what the stall and "
    "oscillation rules need), at most the planned run.",
)


def main(argv: list[str]) -> None:
    del argv
    sweep = lr_sweep.run(
        cli.CONFIG.value,
        cli.WORKDIR.value,
        base_lrs=[float(lr) for lr in _LRS.value],
        factors=tuple(float(f) for f in _FACTORS.value),
        trial_steps=_TRIAL_STEPS.value,
        range_test={
            "min_lr": lr_find.MIN_LR.value,
            "max_lr": lr_find.MAX_LR.value,
            "num_steps": lr_find.NUM_STEPS.value,
            "rule": lr_find.RULE.value,
        },
    )
    written = os.path.join(cli.WORKDIR.value, lr_sweep.DIRECTORY)
    for t in sweep.trials:
        logging.info(
            "lr_sweep | lr.base %.4g | %s | loss at the end %.4g",
            t.base_lr,
            sweep.reading(t),
            t.end_loss,
        )
    if sweep.recommended is None:
        logging.warning("lr_sweep | %s | wrote %s", sweep.reason, written)
        return
    logging.info(
        "lr_sweep | recommended lr.base: %.4g (peak lr %.4g at this global batch; "
        "python -m trainer.plan gives it for another topology): %s | wrote %s",
        sweep.recommended.base_lr,
        sweep.recommended.peak_lr,
        sweep.reason,
        written,
    )


if __name__ == "__main__":
    cli.run(main, "config", "workdir")

"""Which LR range-test reading holds up: every rule of `trainer.lr_find` against grids of runs.

  python -m experiments.lr_rules --output_dir=/tmp/lr_rules [--data_dir=DIR]   # ~10 min, 2 cores
  python -m experiments.lr_rules --output_dir=/tmp/lr_rules_smoke --smoke      # < 2 min

For each set-up: one LR range test (`lr_find.run`, the applied LR swept from 1e-5 to 10 over 300
updates) gives every rule's suggestion; a grid of short runs (`lr_sweep.run` with the grid given:
each the set-up's config compressed to 300 updates, warmup kept, decay squeezed in, evaluated at
the end) says which lr.base is best by eval accuracy. A rule is as good as the eval accuracy of
the grid point nearest its suggestion (in log LR) is close to the best. The sweep's own pick
(lowest loss at the end among trials that did not explode, oscillate or stall) is scored the
same way. Set-ups: configs/default.py (small CNN, SGD momentum, linear scaling),
configs/adamw_sqrt.py (AdamW, sqrt scaling), and configs/default.py with the MLP (another
model). Precision stays the config's `auto` (mixed_bfloat16 on a CPU with AMX, as here).

Writes results.md (the table for docs/lr_selection.md), results.json, and each set-up's
lr_find/ and lr_sweep/ under OUTPUT_DIR/SETUP/. A rerun repeats the range tests (seconds) and
continues the grids (finished runs are not repeated); use a new OUTPUT_DIR for --smoke.
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable

import ml_collections

from configs import adamw_sqrt, default
from trainer import lr_find, lr_sweep

TRIAL_STEPS = 300
RANGE_TEST = {"min_lr": 1e-5, "max_lr": 10.0, "num_steps": 300}
_SGD_GRID = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def _mlp() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.name = "mlp"
    return config


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    config: Callable[[], ml_collections.ConfigDict]
    grid: tuple[float, ...]  # Values of lr.base, x2 apart.


SETUPS = (
    Setup("default (small CNN, SGD, linear)", default.get_config, _SGD_GRID),
    Setup(
        "adamw_sqrt (small CNN, AdamW, sqrt)",
        adamw_sqrt.get_config,
        (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2),
    ),
    Setup("mlp (MLP, SGD, linear)", _mlp, (*_SGD_GRID, 3.2)),
)


def _directory(output_dir: str, setup: Setup) -> str:
    return os.path.join(output_dir, setup.name.split(" ")[0])


def run_setup(
    setup: Setup,
    output_dir: str,
    *,
    data_dir: str | None,
    trial_steps: int = TRIAL_STEPS,
    range_test: dict | None = None,
    grid: tuple[float, ...] | None = None,
) -> dict:
    """The range test and the grid of one set-up; returns what the table needs."""
    config = setup.config()
    config.dataset.data_dir = data_dir
    workdir = _directory(output_dir, setup)
    found = lr_find.run(config, workdir, **(range_test or RANGE_TEST))
    grid = list(grid or setup.grid)
    sweep = lr_sweep.run(config, workdir, base_lrs=grid, trial_steps=trial_steps)
    return {
        "setup": setup.name,
        "suggested_base_lrs": {
            rule: None if lr is None else lr / found.lr_scale
            for rule, lr in found.suggestions.items()
        },
        "sweep_pick": sweep.recommended.base_lr if sweep.recommended else None,
        "eval_accuracy": {t.base_lr: t.eval_metrics.get("eval_accuracy") for t in sweep.trials},
        "readings": {t.base_lr: sweep.reading(t) for t in sweep.trials},
    }


def score(result: dict, base_lr: float | None) -> tuple[float | None, float | None, float | None]:
    """(the grid LR nearest `base_lr` in log scale, its eval accuracy, points below the best)."""
    accuracy = {lr: a for lr, a in result["eval_accuracy"].items() if a is not None}
    if base_lr is None or not accuracy:
        return None, None, None
    nearest = min(accuracy, key=lambda lr: abs(math.log(lr / base_lr)))
    return nearest, accuracy[nearest], 100 * (max(accuracy.values()) - accuracy[nearest])


def summarize(results: list[dict]) -> str:
    """The Markdown tables: the grids, then each rule's suggestion and what it costs."""
    lines = []
    best = {}  # Per set-up: the grid's lr.base of the best eval accuracy.
    for result in results:
        accuracy = result["eval_accuracy"]
        best[result["setup"]] = max(accuracy, key=lambda lr: accuracy[lr] or 0.0)
        lines += [
            f"**{result['setup']}**: eval accuracy after {TRIAL_STEPS} updates per lr.base "
            f"(best {best[result['setup']]:g}):",
            "",
            "| lr.base | " + " | ".join(f"{lr:g}" for lr in accuracy) + " |",
            "|---|" + "---|" * len(accuracy),
            "| eval accuracy | "
            + " | ".join("" if a is None else f"{100 * a:.1f}%" for a in accuracy.values())
            + " |",
            "| sweep reading | " + " | ".join(result["readings"].values()) + " |",
            "",
        ]
    rules = [*lr_find.RULES, "lr_sweep pick"]
    lines += [
        "| rule | " + " | ".join(r["setup"].split(" ")[0] for r in results) + " | worst |",
        "|---|" + "---|" * (len(results) + 1),
    ]
    for rule in rules:
        cells, worst = [], 0.0
        for result in results:
            suggested = (
                result["sweep_pick"]
                if rule == "lr_sweep pick"
                else result["suggested_base_lrs"][rule]
            )
            _, _, lost = score(result, suggested)
            if lost is None:
                cells.append("no suggestion")
                worst = math.inf
                continue
            worst = max(worst, lost)
            times_best = suggested / best[result["setup"]]
            cells.append(f"{suggested:.3g} ({times_best:.2g}x best): -{lost:.1f} pts")
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | -{worst:.1f} pts |")
    return "\n".join(lines) + "\n"


def run_experiment(output_dir: str, *, setups, data_dir: str | None, **short) -> list[dict]:
    """Every set-up, then results.json and results.md in `output_dir`. `short` shrinks the runs
    (trial_steps, range_test, grid) for the smoke version."""
    results = [run_setup(s, output_dir, data_dir=data_dir, **short) for s in setups]
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(summarize(results))
    return results

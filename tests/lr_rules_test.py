"""experiments/lr_rules/: how a rule is scored, and the smoke run through lr_find and lr_sweep."""

import json
import sys

import pytest
import testutil

from experiments import lr_rules

RESULT = {
    "setup": "toy",
    "suggested_base_lrs": {rule: 0.05 for rule in lr_rules.lr_find.RULES},
    "sweep_pick": 0.2,
    "eval_accuracy": {0.025: 0.5, 0.1: 0.97, 0.2: 0.99, 0.4: 0.8},
    "readings": {0.025: "too slow", 0.1: "too slow", 0.2: "recommended", 0.4: "oscillates"},
}


@pytest.mark.parametrize(
    ("base_lr", "expected"),
    [
        (0.2, (0.2, 0.99, 0.0)),
        (0.15, (0.2, 0.99, 0.0)),  # Nearer 0.2 than 0.1 in log LR (log 1.33 < log 1.5).
        (0.05, (0.025, 0.5, 49.0)),  # The geometric middle of 0.025 and 0.1 goes to the first.
        (1e-6, (0.025, 0.5, 49.0)),
        (None, (None, None, None)),
    ],
)
def test_a_suggestion_scores_the_grid_point_nearest_it_in_log_lr(base_lr, expected):
    nearest, accuracy, lost = lr_rules.score(RESULT, base_lr)
    assert (nearest, accuracy) == expected[:2]
    assert lost == pytest.approx(expected[2])


def test_the_table_gives_each_rule_its_cost():
    table = lr_rules.summarize([RESULT])
    assert "| minimum/3 | 0.05 (0.25x best): -49.0 pts | -49.0 pts |" in table
    assert "| lr_sweep pick | 0.2 (1x best): -0.0 pts | -0.0 pts |" in table


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path, data_dir):
    testutil.run_command(
        [
            sys.executable,
            "-m",
            "experiments.lr_rules",
            "--smoke",
            f"--output_dir={tmp_path}",
            f"--data_dir={data_dir}",
        ],
        timeout=300,
    )
    (setup,) = json.loads((tmp_path / "results.json").read_text())
    assert sorted(setup["suggested_base_lrs"]) == sorted(lr_rules.lr_find.RULES)
    assert sorted(float(lr) for lr in setup["eval_accuracy"]) == [0.05, 0.2]
    assert "| lr_sweep pick |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "default" / "lr_sweep" / "lr_sweep.png").exists()

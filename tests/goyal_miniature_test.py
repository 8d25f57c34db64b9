"""experiments/goyal_miniature/: the arms' configs say what the table says; the smoke run
writes the table and the plot."""

import json
import sys

import pytest
import testutil

from experiments import goyal_miniature
from trainer import learning_rate
from trainer import plan as plan_lib
from trainer.datasets import shapes


def _plan(arm):
    config = goyal_miniature.arm_config(arm, seed=0, epochs=18.0, data_dir=None)
    plan = plan_lib.make_plan(
        config, num_replicas=1, num_workers=1, train_examples=shapes.SPLITS["train"][0]
    )
    return plan, learning_rate.planned_curve(plan, config.lr)


# (arm name, global batch, peak LR, LR of the first update, warmup updates)
ARM_CASES = [
    ("sgd small batch", 50, 0.02, 0.02, 0),
    ("sgd 8x, no scaling", 400, 0.02, 0.02, 0),
    ("sgd 8x, linear, no warmup", 400, 0.16, 0.16, 0),
    ("sgd 8x, linear, gradual warmup", 400, 0.16, 0.02 + 0.14 / 30, 30),  # 1 epoch.
    ("sgd 8x, linear, constant warmup", 400, 0.16, 0.02, 30),
    ("adamw 8x, sqrt, gradual warmup", 400, 1e-3 * 8**0.5, None, 30),
    ("adamw 8x, linear, gradual warmup", 400, 8e-3, None, 30),
]


@pytest.mark.parametrize(("name", "batch", "peak", "first_lr", "warmup"), ARM_CASES)
def test_arms_have_the_batch_scaling_and_warmup_they_are_named_for(
    name, batch, peak, first_lr, warmup
):
    (arm,) = [arm for arm in goyal_miniature.ARMS if arm.name == name]
    plan, curve = _plan(arm)
    assert plan.global_batch_size == batch and plan.per_replica_batch_size == 50
    assert plan.total_steps == 18 * 12_000 // batch  # The same 18 epochs for every arm.
    assert plan.peak_lr == pytest.approx(peak)
    assert plan.warmup_steps == warmup
    if first_lr is not None:
        assert curve[0] == pytest.approx(first_lr, rel=1e-5)
    assert curve[warmup] == pytest.approx(peak, rel=1e-5)  # The first update after warmup.
    assert curve[-1] == pytest.approx(peak * 0.001, rel=1e-5)  # x0.1 three times.


@pytest.mark.slow
def test_smoke_run_writes_table_and_plot(tmp_path, data_dir):
    testutil.run_command(
        [
            sys.executable,
            "-m",
            "experiments.goyal_miniature",
            "--smoke",
            f"--output_dir={tmp_path}",
            f"--data_dir={data_dir}",
        ],
        timeout=300,
    )
    table = (tmp_path / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(goyal_miniature.SMOKE_ARMS)
    for arm, row in zip(goyal_miniature.SMOKE_ARMS, table[2:], strict=True):
        assert row.startswith(f"| {arm.name} | ") and " ± 0.00 | 1 | " in row
    runs = json.loads((tmp_path / "results.json").read_text())
    assert [run["arm"] for run in runs] == [arm.name for arm in goyal_miniature.SMOKE_ARMS]
    assert all(0 <= run["eval_error"][-1] <= 1 for run in runs)
    assert (tmp_path / "eval_error.png").read_bytes().startswith(testutil.PNG_MAGIC)

"""Tests for trainer/plan.py: hand-computed plan numbers, topology invariance, errors, the CLI."""

import dataclasses
import math
import re

import numpy as np
import pytest
import testutil
from testutil import PNG_MAGIC

from trainer import config_check, learning_rate
from trainer import plan as plan_lib
from trainer.datasets import shapes
from trainer.errors import ConfigError
from trainer.plan import __main__ as plan_cli

_config = testutil.config_with


def _plan(config, replicas=1, train_examples=12800):
    """As setup.prepare plans: the config checked, then resolved for the topology."""
    config_check.check_config(config)
    return plan_lib.make_plan(
        config, num_replicas=replicas, num_workers=1, train_examples=train_examples
    )


def _cosine_with_warmup(update, peak, warmup, total):
    """Linear warmup from 0 then cosine to 0, for the 1-based update number (by hand)."""
    if update <= warmup:
        return peak * update / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (update - warmup) / (total - warmup)))


# Default: global batch 128, 600 steps, warmup 50 steps, base LR 0.2 at batch 256, linear.
# (config fields, replicas, train examples, per-replica batch, steps/epoch, total steps, warmup)
NUMBERS_CASES = [
    ({}, 1, 12800, 128, 100.0, 600, 50),
    ({}, 4, 12800, 32, 100.0, 600, 50),
    ({}, 8, 1000, 16, 1000 / 128, 600, 50),
    # Epochs and examples take precedence over total_steps (still 600 here).
    ({"total_epochs": 3.0}, 2, 12800, 64, 100.0, 300, 50),
    ({"total_epochs": 2.5, "lr.warmup_steps": 5}, 1, 1000, 128, 7.8125, 20, 5),  # 19.53 -> 20
    ({"total_examples": 12800}, 1, 12800, 128, 100.0, 100, 50),
    ({"total_examples": 1000, "lr.warmup_steps": 5}, 1, 12800, 128, 100.0, 8, 5),  # 7.81 -> 8
    ({"global_batch_size": 256, "total_epochs": 4.0}, 4, 12800, 64, 50.0, 200, 50),
    # Warmup in epochs overrides lr.warmup_steps.
    ({"lr.warmup_epochs": 0.3}, 1, 12800, 128, 100.0, 600, 30),
    ({"lr.warmup_epochs": 1.0, "lr.warmup_steps": 10}, 1, 12800, 128, 100.0, 600, 100),
    ({"lr.warmup_epochs": 0.2, "global_batch_size": 64}, 2, 12800, 32, 200.0, 600, 40),
    # Accumulation: steps and epochs count updates of the whole global batch (2 x 16 x 4 = 128).
    ({"accumulation_steps": 4}, 2, 12800, 16, 100.0, 600, 50),
    (
        {
            "global_batch_size": 1024,
            "accumulation_steps": 8,
            "total_epochs": 2.0,
            "lr.warmup_epochs": 0.5,
        },
        4,
        12800,
        32,
        12.5,
        25,
        6,  # 6.25 -> 6
    ),
]


@pytest.mark.parametrize(
    ("fields", "replicas", "examples", "per_replica", "steps_per_epoch", "total", "warmup"),
    NUMBERS_CASES,
)
def test_plan_numbers(fields, replicas, examples, per_replica, steps_per_epoch, total, warmup):
    plan = _plan(_config(**fields), replicas=replicas, train_examples=examples)
    assert plan.num_replicas == replicas
    assert plan.per_replica_batch_size == per_replica
    assert plan.micro_batch_size == per_replica * replicas
    assert plan.micro_batch_size * plan.accumulation_steps == plan.global_batch_size
    assert plan.train_examples == examples
    assert plan.steps_per_epoch == pytest.approx(steps_per_epoch)
    assert plan.total_steps == total
    assert plan.warmup_steps == warmup


# (scaling, global batch, expected peak): base 0.2 tuned at batch 256.
PEAK_CASES = [
    ("linear", 128, 0.2 * 128 / 256),
    ("linear", 1024, 0.2 * 4),
    ("sqrt", 128, 0.2 * math.sqrt(0.5)),
    ("sqrt", 1024, 0.2 * 2),
    ("none", 128, 0.2),
    ("none", 1024, 0.2),
]


@pytest.mark.parametrize(("scaling", "batch", "peak"), PEAK_CASES)
def test_peak_lr(scaling, batch, peak):
    plan = _plan(_config(**{"lr.scaling": scaling, "global_batch_size": batch}))
    assert plan.peak_lr == pytest.approx(peak, rel=1e-12)
    assert plan.lr_scaling == scaling
    # The curve reaches the peak exactly at the last warmup update and never exceeds it.
    curve = learning_rate.planned_curve(plan, _config(**{"lr.scaling": scaling}).lr)
    assert curve[plan.warmup_steps - 1] == pytest.approx(peak, rel=1e-6)
    assert max(curve) == pytest.approx(peak, rel=1e-6)


# (unit, values given, steps expected) with 100 steps per epoch and a global batch of 128.
UNIT_CASES = [
    ("steps", (200, 400), (200, 400)),
    ("epochs", (2, 4), (200, 400)),
    ("epochs", (1.5, 4.25), (150, 425)),
    ("examples", (25600, 51200), (200, 400)),
    ("examples", (12900, 51100), (round(12900 / 128), round(51100 / 128))),
]


@pytest.mark.parametrize(("unit", "values", "steps"), UNIT_CASES)
def test_boundaries_and_milestones_converted_to_steps(unit, values, steps):
    config = _config(
        **{
            "lr.decay": "piecewise",
            "lr.boundaries": values,
            "lr.boundaries_unit": unit,
            "lr.multipliers": (0.1, 0.01),
            "lr.milestones": values,
            "lr.milestones_unit": unit,
            "lr.milestone_values": (0.5, 0.5),
        }
    )
    plan = _plan(config, train_examples=12800)
    assert plan.boundaries == steps
    assert plan.milestones == steps
    # The piecewise curve changes right after each boundary (curve[i] is update i + 1).
    curve = np.array(learning_rate.planned_curve(plan, config.lr))
    first, second = steps
    np.testing.assert_allclose(
        curve[[first - 1, first, second - 1, second]],
        [plan.peak_lr, 0.1 * plan.peak_lr, 0.1 * plan.peak_lr, 0.01 * plan.peak_lr],
        rtol=1e-6,
    )


@pytest.mark.parametrize("scaling", ["linear", "sqrt", "none"])
def test_same_global_batch_same_plan_on_1_2_4_replicas(scaling):
    config = _config(**{"lr.scaling": scaling, "lr.milestones": (1, 3)})
    config.lr.milestone_values = (0.5, 0.5)
    plans = {r: _plan(config, replicas=r) for r in (1, 2, 4)}
    for replicas, plan in plans.items():
        assert plan.per_replica_batch_size == 128 // replicas
        # Everything but the topology fields is identical.
        assert dataclasses.replace(plan, num_replicas=1, per_replica_batch_size=128) == plans[1]
    curves = [learning_rate.planned_curve(plan, config.lr) for plan in plans.values()]
    assert curves[0] == curves[1] == curves[2]
    assert len(curves[0]) == 600


def test_accumulation_plans_as_more_replicas_would():
    """2 replicas x 4 micro-batches of 128 = 8 replicas x 128: one global batch of 1024, the
    same steps, warmup and peak LR (scaled for 1024); the start-up line says how it is made."""
    config = _config(global_batch_size=1024, total_epochs=4.0)
    replicas = _plan(config, replicas=8)
    config.accumulation_steps = 4
    accumulated = _plan(config, replicas=2)
    assert (accumulated.micro_batch_size, accumulated.per_replica_batch_size) == (256, 128)
    assert accumulated.peak_lr == 0.2 * 1024 / 256
    assert accumulated == dataclasses.replace(
        replicas, num_replicas=2, accumulation_steps=4, micro_batch_size=256
    )
    assert "global batch: 1024 | per-replica batch: 128 | accumulation steps: 4 |" in (
        accumulated.summary()
    )


@pytest.mark.parametrize(
    ("scaling", "ratio"), [("linear", 2.0), ("sqrt", math.sqrt(2)), ("none", 1)]
)
def test_doubling_the_batch_scales_lr_at_equal_examples_seen(scaling, ratio):
    # Durations in epochs, so both runs see the same examples; warmup 100 / 50 updates.
    fields = {"lr.scaling": scaling, "total_epochs": 4.0, "lr.warmup_epochs": 0.5}
    small_config = _config(global_batch_size=128, **fields)
    large_config = _config(global_batch_size=256, **fields)
    small = _plan(small_config, replicas=2, train_examples=25600)
    large = _plan(large_config, replicas=4, train_examples=25600)
    assert (small.total_steps, small.warmup_steps) == (800, 100)
    assert (large.total_steps, large.warmup_steps) == (400, 50)
    assert large.peak_lr == pytest.approx(ratio * small.peak_lr, rel=1e-12)
    small_curve = np.array(learning_rate.planned_curve(small, small_config.lr))
    large_curve = np.array(learning_rate.planned_curve(large, large_config.lr))
    # After large update k, 256 k examples were seen: as many as after small update 2k.
    k = np.arange(1, large.total_steps + 1)
    np.testing.assert_allclose(large_curve[k - 1], ratio * small_curve[2 * k - 1], atol=1e-7)
    # And both follow the hand-computed warmup + cosine in examples seen.
    for update in (1, 25, 50, 51, 200, 399):
        expected = _cosine_with_warmup(update, large.peak_lr, 50, 400)
        assert large_curve[update - 1] == pytest.approx(expected, rel=1e-5, abs=1e-7)


# (fields, replicas, regex fragments the message must contain)
ERROR_CASES = [
    ({"global_batch_size": 250}, 4, [r"global_batch_size \(250\)", r"4 replicas", "multiple of 4"]),
    ({"global_batch_size": 100}, 8, [r"global_batch_size \(100\)", r"8 replicas", "multiple of 8"]),
    ({"global_batch_size": -8}, 1, [r"global_batch_size \(-8\)", "positive"]),
    ({"accumulation_steps": 0}, 1, [r"accumulation_steps \(0\)", "positive"]),
    (
        {"accumulation_steps": 3},
        2,
        [r"global_batch_size \(128\)", "2 replicas x 3 accumulation_steps", "multiple of 6"],
    ),
    ({"total_steps": 0}, 1, [r"total_steps \(0\)", "positive"]),
    ({"total_steps": -5}, 1, [r"total_steps \(-5\)", "positive"]),
    ({"total_epochs": 0.0}, 1, [r"total_epochs \(0.0\)", "positive"]),
    ({"total_epochs": 0.001}, 1, [r"0 steps", "total_steps/total_epochs"]),
    ({"steps_per_loop": 0}, 1, [r"steps_per_loop \(0\)", "positive"]),
    ({"steps_per_loop": -1}, 1, [r"steps_per_loop \(-1\)", "positive"]),
    ({"lr.base": 0.0}, 1, [r"lr\.base \(0\.0\)", "positive"]),
    ({"lr.base": -0.1}, 1, [r"lr\.base \(-0\.1\)", "positive"]),
    ({"lr.scaling": "cubic"}, 1, [r"lr\.scaling \('cubic'\)", "linear, sqrt, none"]),
    ({"lr.decay": "step"}, 1, [r"lr\.decay \('step'\)", "cosine"]),
    ({"lr.warmup": "cosine"}, 1, [r"lr\.warmup \('cosine'\)", "linear, exponential"]),
    ({"lr.warmup_steps": 600}, 1, [r"lr\.warmup_steps \(600\)", r"total_steps \(600\)"]),
    ({"lr.warmup_epochs": 7.0}, 1, [r"lr\.warmup_steps \(700\)", r"total_steps \(600\)"]),
    (
        {"lr.milestones": (1, 2), "lr.milestone_values": (0.1,)},
        1,
        [re.escape("lr.milestones ((1, 2))"), re.escape("lr.milestone_values ((0.1,))")],
    ),
    (
        {"lr.milestones": (2, 1), "lr.milestone_values": (0.1, 0.1)},
        1,
        [re.escape("lr.milestones ((2, 1))"), "strictly increasing"],
    ),
    (
        {"lr.milestones": (1, 1), "lr.milestone_values": (0.1, 0.1)},
        1,
        [re.escape("lr.milestones ((1, 1))"), "strictly increasing"],
    ),
    (
        {"lr.milestones": (1,), "lr.milestone_values": (0.1,), "lr.milestones_unit": "weeks"},
        1,
        [r"lr\.milestones unit \('weeks'\)", "steps, epochs, examples"],
    ),
    (
        {
            "lr.decay": "piecewise",
            "lr.boundaries": (100,),
            "lr.multipliers": (0.1,),
            "lr.boundaries_unit": "days",
        },
        1,
        [r"lr\.boundaries unit \('days'\)", "steps, epochs, examples"],
    ),
    ({"nan_policy": "ignore"}, 1, [r"nan_policy \('ignore'\)", "fail, recover"]),
    ({"lr.plateau_factor": 1.0}, 1, [r"lr\.plateau_factor \(1\.0\)", r"\(0, 1\)"]),
    ({"lr.plateau_factor": 0.0}, 1, [r"lr\.plateau_factor \(0\.0\)", r"\(0, 1\)"]),
    ({"lr.plateau_factor": 1.5}, 1, [r"lr\.plateau_factor \(1\.5\)", r"\(0, 1\)"]),
    (
        {"total_epochs": 2.0, "total_examples": 1000},
        1,
        ["total_epochs and total_examples", "one unit"],
    ),
]


@pytest.mark.parametrize(("fields", "replicas", "fragments"), ERROR_CASES)
def test_errors_name_field_and_value(fields, replicas, fragments):
    config = _config(**fields)
    with pytest.raises(ConfigError, match=fragments[0]) as error:
        # What start-up resolves: the plan, then its LR curve (which checks its own fields).
        learning_rate.base_schedule(_plan(config, replicas=replicas), config.lr)
    for fragment in fragments[1:]:
        assert re.search(fragment, str(error.value)), (fragment, str(error.value))


def test_describe_has_the_key_numbers_and_hand_computed_lrs():
    config = _config(**{"lr.milestones": (2.0,), "lr.milestone_values": (0.1,)})
    plan = _plan(config, replicas=2, train_examples=12800)
    text = plan_lib.describe(plan, config.lr)
    for fragment in (
        "replicas: 2",
        "global batch: 128",
        "per-replica batch: 64",
        "accumulation steps: 1",
        "steps/epoch: 100.00",
        "peak lr: 0.1 ",
        "warmup steps: 50",
        "total steps: 600",
        "milestones (steps, applied by lr_control): [200]",
    ):
        assert fragment in text, fragment
    rows = {}
    for line in text.splitlines():
        cells = line.split(" | ")
        if len(cells) == 3 and cells[0].isdigit():
            rows[int(cells[0])] = (float(cells[1]), float(cells[2]))
    assert {1, 50, 200, 300, 600} <= set(rows)
    for step, (epoch, lr) in rows.items():
        assert epoch == pytest.approx(step / 100, abs=0.005)
        assert lr == pytest.approx(_cosine_with_warmup(step, 0.1, 50, 600), rel=1e-5, abs=1e-9)


def test_plot_writes_png(tmp_path):
    config = _config()
    path = tmp_path / "lr.png"
    plan_lib.plot(_plan(config), config.lr, str(path))
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def _run_cli(capsys, *args):
    config = f"{testutil.REPO}/configs/default.py"
    testutil.run_cli_in_process(plan_cli.main, f"--config={config}", *args)
    return capsys.readouterr().out


def test_cli_plans_for_another_topology(tmp_path, capsys):
    png = tmp_path / "lr.png"
    out = _run_cli(capsys, "--replicas=8", "--train_examples=12000", f"--plot={png}")
    (summary,) = [line for line in out.splitlines() if line.startswith("plan | ")]
    assert "replicas: 8" in summary
    assert "per-replica batch: 16" in summary
    assert f"steps/epoch: {12000 / 128:.2f}" in summary
    assert "total steps: 600" in summary
    assert f"wrote {png}" in out
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_cli_reads_train_examples_from_the_dataset(tmp_path, data_dir, capsys):
    """No --train_examples: the size comes from the prepared dataset's metadata, for the split
    the config trains on. Training on the test split (2,000), not the default train split
    (12,000), so a CLI that ignored the dataset or its split would print another steps/epoch."""
    from absl import flags  # Here, for the cleanup below.

    def drop_config_overrides() -> None:
        """ml_collections defines a flag per `--config.FIELD` it parses; a second definition in
        this process (another test parsing the same override) would be an error."""
        for name in [name for name in flags.FLAGS if name.startswith("config.")]:
            delattr(flags.FLAGS, name)

    png = tmp_path / "lr.png"
    drop_config_overrides()
    try:
        out = _run_cli(
            capsys,
            f"--config.dataset.data_dir={data_dir}",
            "--config.dataset.train_split=test",
            f"--plot={png}",
        )
    finally:
        drop_config_overrides()
    (summary,) = [line for line in out.splitlines() if line.startswith("plan | ")]
    assert "replicas: 1" in summary and "per-replica batch: 128" in summary
    train_examples = shapes.SPLITS["test"][0]
    assert train_examples != shapes.SPLITS["train"][0]
    assert f"steps/epoch: {train_examples / 128:.2f} " in summary  # 15.62, not 93.75.
    assert png.read_bytes().startswith(PNG_MAGIC)

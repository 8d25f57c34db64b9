"""The LR range test: an exponential sweep of applied LRs, a suggestion, only its own files."""

import json
import logging
import os

import numpy as np
import pytest
import testutil
from absl import flags
from absl import logging as absl_logging

from trainer import lr_find


def test_smoothing_is_a_bias_corrected_moving_average():
    np.testing.assert_allclose(lr_find.smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
    beta = 0.9
    expected_second = (beta * (1 - beta) * 1.0 + (1 - beta) * 3.0) / (1 - beta**2)
    assert lr_find.smooth([1.0, 3.0], beta)[1] == pytest.approx(expected_second)


LRS = list(np.geomspace(1e-4, 1.0, 61))
# A range test's smoothed curve, by construction: a dip at update 1 (the smoothing warming up,
# in the first tenth that the rules leave out), flat at 3.0 to update 20, falling 0.1 an update
# to the minimum at 40 with one steeper drop (0.5) from 30 to 31, rising after it.
CURVE = (
    [3.0, 2.0]
    + [3.0] * 19
    + [2.9 - 0.1 * k for k in range(10)]
    + [1.5 - 0.1 * k for k in range(10)]
)
CURVE += [0.8 + 0.2 * k for k in range(1, 21)]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("minimum/10", LRS[40] / 10),
        ("minimum/3", LRS[40] / 3),
        ("steepest", LRS[30]),  # The 0.5 drop; untrimmed, the dip at update 1 would win.
        # The longest decreasing subsequence: one 3.0, then 21..40 (21 long, ending at 40), so
        # fastai's start is 40 - 21 = 19 and the pick 19 + 7 + 3 = 29.
        ("valley", LRS[29]),
    ],
)
def test_each_rule_reads_its_lr_off_the_trimmed_curve(rule, expected):
    assert len(CURVE) == len(LRS)
    assert lr_find.suggest(LRS, CURVE, rule) == pytest.approx(expected)


def test_the_default_rule_is_the_validated_one():
    """docs/lr_selection.md: a third of the minimum came closest to the best short-run LR."""
    assert lr_find.DEFAULT_RULE == "minimum/3"
    assert lr_find.suggest(LRS, CURVE) == pytest.approx(LRS[40] / 3)


def test_no_suggestion_from_a_flat_curve():
    assert lr_find.suggest([1e-3, 1e-2, 1e-1], [2.30, 2.29, 2.31]) is None


@pytest.mark.parametrize(
    ("min_lr", "max_lr", "steps", "message"),
    [
        (0.1, 0.01, 10, r"--min_lr \(0.1\) and --max_lr \(0.01\) need 0 < min_lr < max_lr"),
        (0.0, 1.0, 10, r"--min_lr \(0.0\) and --max_lr \(1.0\) need 0 < min_lr < max_lr"),
        (1e-3, 1.0, 1, r"--num_steps \(1\) must be at least 2"),
    ],
)
def test_bad_sweeps_are_rejected(min_lr, max_lr, steps, message, tmp_path):
    from configs import default as default_config

    with pytest.raises(ValueError, match=message):
        lr_find.run(
            default_config.get_config(),
            str(tmp_path),
            min_lr=min_lr,
            max_lr=max_lr,
            num_steps=steps,
        )


def _run_lr_find_in_process(*argv: str) -> None:
    """`python -m trainer.lr_find ARGV` in this process: the same flag parsing and `main`.

    ml_collections defines a flag per `--config.FIELD` override it parses, and defining one twice
    in a process is an error, so those are dropped before and after (other tests parse too).
    """

    def drop_config_overrides() -> None:
        for name in [name for name in flags.FLAGS if name.startswith("config.")]:
            delattr(flags.FLAGS, name)

    def main(args: list[str]) -> None:
        absl_logging.set_verbosity(absl_logging.INFO)  # As under `cli.run`; parsing reset it.
        lr_find.main(args)

    drop_config_overrides()
    try:
        testutil.run_cli_in_process(main, *argv)
    finally:
        drop_config_overrides()


def test_command_sweeps_the_applied_lr_and_leaves_the_run_alone(tmp_path, data_dir, caplog):
    """The command's own `main`, in-process (a fresh process only adds TF's start-up here)."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "sentinel").write_text("a run's checkpoint")
    argv = testutil.main_flags(
        tmp_path,
        "--config.model.name=mlp",
        "--config.model.width=8",
        # Op determinism is process-wide and cannot be turned off again; the sweep does not
        # need it.
        "--config.deterministic=False",
        "--min_lr=1e-4",
        "--max_lr=10",
        "--num_steps=40",
        "--rule=minimum/10",
        data_dir=data_dir,
    )
    with caplog.at_level(logging.INFO, logger="absl"):
        _run_lr_find_in_process(*argv)
    assert "suggested lr.base" in caplog.text

    found = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    rates = np.array(found["learning_rates"])
    assert rates[0] == pytest.approx(1e-4, rel=1e-5)
    # Applied LRs, read from the optimizer, grow by one constant factor per step.
    np.testing.assert_allclose(rates[1:] / rates[:-1], (1e5) ** (1 / 39), rtol=1e-4)
    # The loss gets worse long before LR 10: the suggestion sits well inside the sweep.
    assert 1e-4 < found["suggested_lr"] < 0.1
    # --rule picks which of every rule's readings (all recorded) is the suggestion.
    assert found["rule"] == "minimum/10" and set(found["suggestions"]) == set(lr_find.RULES)
    assert found["suggested_lr"] == found["suggestions"]["minimum/10"]
    assert found["suggestions"]["minimum/3"] == pytest.approx(found["suggested_lr"] * 10 / 3)
    assert found["smoothed"][-1] > min(found["smoothed"])
    assert (tmp_path / "lr_find" / "lr_find.png").read_bytes().startswith(testutil.PNG_MAGIC)
    assert os.listdir(checkpoints) == ["sentinel"]
    assert not (tmp_path / "metrics.jsonl").exists()

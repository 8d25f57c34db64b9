"""The LR range test: an exponential sweep of applied LRs, a suggestion, only its own files."""

import json
import os
import subprocess

import numpy as np
import pytest
import testutil

from trainer import lr_find


def test_smoothing_is_a_bias_corrected_moving_average():
    np.testing.assert_allclose(lr_find.smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])
    beta = 0.9
    expected_second = (beta * (1 - beta) * 1.0 + (1 - beta) * 3.0) / (1 - beta**2)
    assert lr_find.smooth([1.0, 3.0], beta)[1] == pytest.approx(expected_second)


def test_suggestion_is_a_tenth_of_the_lr_at_the_smoothed_minimum():
    learning_rates = list(np.geomspace(1e-4, 1.0, 9))
    smoothed = [3, 2.9, 2.5, 2.0, 1.5, 1.2, 1.4, 2.5, 6.0]
    assert lr_find.suggest(learning_rates, smoothed) == pytest.approx(learning_rates[5] / 10)


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


@pytest.mark.slow
def test_command_sweeps_the_applied_lr_and_leaves_the_run_alone(tmp_path, data_dir):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "sentinel").write_text("a run's checkpoint")
    command = testutil.main_command(
        tmp_path,
        "--config.model.name=mlp",
        "--config.model.width=8",
        "--min_lr=1e-4",
        "--max_lr=10",
        "--num_steps=40",
        data_dir=data_dir,
        module="trainer.lr_find",
    )
    result = subprocess.run(
        command, cwd=testutil.REPO, env=testutil.ENV, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "suggested lr.base" in result.stderr

    found = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    rates = np.array(found["learning_rates"])
    assert rates[0] == pytest.approx(1e-4, rel=1e-5)
    # Applied LRs, read from the optimizer, grow by one constant factor per step.
    np.testing.assert_allclose(rates[1:] / rates[:-1], (1e5) ** (1 / 39), rtol=1e-4)
    # The loss gets worse long before LR 10: the suggestion sits well inside the sweep.
    assert 1e-4 < found["suggested_lr"] < 0.1
    assert found["smoothed"][-1] > min(found["smoothed"])
    assert (tmp_path / "lr_find" / "lr_find.png").read_bytes().startswith(testutil.PNG_MAGIC)
    assert os.listdir(checkpoints) == ["sentinel"]
    assert not (tmp_path / "metrics.jsonl").exists()

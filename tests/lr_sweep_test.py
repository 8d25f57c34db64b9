"""The LR stability sweep: trials through the real trainer, health verdicts, a recommendation that
holds up, cheap to stop and resume."""

import importlib
import json
import logging
import math

import numpy as np
import pytest
import testutil

from trainer import lr_sweep, preemption
from trainer import plan as plan_lib
from trainer.errors import ConfigError


def _trial(base_lr: float, verdict: str, end_loss: float) -> lr_sweep.Trial:
    return lr_sweep.Trial(base_lr, 2 * base_lr, verdict, end_loss, {}, [], f"lr_{base_lr}")


@pytest.mark.parametrize(
    ("trials", "recommended", "readings"),
    [
        (  # The classic picture: too slow, good, oscillating, exploding.
            [
                (0.01, "healthy", 1.2),
                (0.1, "healthy", 0.2),
                (1, "oscillates", 0.9),
                (10, "explodes", math.inf),
            ],
            0.1,
            ["too slow", "recommended", "oscillates", "explodes"],
        ),
        (  # A stall below the pick is an LR too small; above it, a dead network.
            [(0.001, "stalls", 2.3), (0.1, "healthy", 0.2), (1, "stalls", 2.3)],
            0.1,
            ["too slow", "recommended", "stalls"],
        ),
        (  # A run that survived a spike can still be the best; a healthy one above it is not slow.
            [(0.1, "healthy", 0.5), (0.3, "spikes", 0.3), (1, "healthy", 0.4)],
            0.3,
            ["too slow", "recommended", "healthy"],
        ),
        (  # Nothing trainable: no pick, every verdict stands.
            [(1, "stalls", 2.3), (10, "explodes", math.inf)],
            None,
            ["stalls", "explodes"],
        ),
    ],
)
def test_recommendation_and_readings(trials, recommended, readings):
    trials = [_trial(*t) for t in trials]
    pick, reason = lr_sweep.recommend(trials)
    sweep = lr_sweep.Sweep(trials, 100, pick, reason)
    assert (pick and pick.base_lr) == recommended
    assert [sweep.reading(t) for t in trials] == readings
    if pick is None:
        assert "widen the grid" in reason


def test_reason_names_where_training_breaks():
    trials = [_trial(0.1, "healthy", 0.2), _trial(0.4, "oscillates", 1), _trial(1.6, "stalls", 2)]
    _, reason = lr_sweep.recommend(trials)
    assert reason.endswith("from lr.base 0.4 up: oscillates, stalls")


def test_end_loss_is_the_median_of_the_last_tenth():
    losses = np.concatenate([np.full(90, 5.0), [1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 9.0]])
    assert lr_sweep.end_loss(losses) == 1.5
    assert lr_sweep.end_loss(np.array([1.0, np.nan])) == math.inf
    assert lr_sweep.end_loss(np.array([3.0])) == 3.0


def _plan(config):
    return plan_lib.make_plan(config, num_replicas=1, num_workers=1, train_examples=12_000)


def test_a_trial_is_the_run_compressed_with_nothing_that_hides_instability():
    config = testutil.config_with(
        **{
            "total_epochs": 10.0,  # 937 updates of 128.
            "nan_policy": "recover",
            "health.action": "skip",
            "lr.warmup_epochs": 0.5,  # 47 updates.
            "lr.milestones": (3,),
            "lr.milestone_values": (0.1,),
            "lr.plateau_metric": "eval_loss",
            "export_at_end": True,
            "best_metric": "eval_accuracy",
        }
    )
    trial = lr_sweep.trial_config(config, _plan(config), 0.05, 250)
    assert (trial.lr.base, trial.total_steps, trial.total_epochs) == (0.05, 250, None)
    assert (trial.lr.warmup_steps, trial.lr.warmup_epochs) == (47, None)  # Kept in updates.
    assert (trial.nan_policy, trial.health.action) == ("fail", "warn")
    assert (trial.lr.milestones, trial.lr.plateau_metric) == ((), "")
    assert (trial.export_at_end, trial.best_metric, trial.checkpoint_every_steps) == (
        False,
        "",
        200,
    )
    assert trial.optimizer.to_dict() == config.optimizer.to_dict()
    assert config.nan_policy == "recover"  # The run's config is left alone.
    with pytest.raises(AttributeError):  # Locked like every config: a typo fails.
        trial.totl_steps = 3


def test_a_piecewise_or_exponential_decay_shrinks_with_the_trial():
    config = testutil.config_with(
        **{
            "total_steps": 1000,
            "lr.warmup_steps": 50,
            "lr.decay": "piecewise",
            "lr.boundaries": (300, 600, 900),
            "lr.multipliers": (0.1, 0.01, 0.001),
            "lr.decay_steps": 100,
        }
    )
    trial = lr_sweep.trial_config(config, _plan(config), 0.1, 240)
    # After the 50 warmup updates, 950 planned updates become 190: a fifth.
    assert (trial.lr.boundaries_unit, trial.lr.boundaries) == ("steps", (100, 160, 220))
    assert trial.lr.decay_steps == 20


def test_default_trial_length_is_the_warmup_plus_two_trend_windows():
    assert lr_sweep.default_trial_steps(50, 600, 100) == 250
    assert lr_sweep.default_trial_steps(50, 200, 100) == 200


def test_a_trial_that_ends_on_a_nan_is_saved_as_exploding():
    trial = _trial(10.0, "explodes", math.inf)
    saved = json.loads(json.dumps(trial.to_json()))  # Valid JSON: null, not Infinity.
    assert saved["end_loss"] is None
    assert lr_sweep.Trial.from_json(saved) == trial


def _tiny(data_dir, **fields):
    """20-update runs of a tiny MLP; the trend window at its minimum so 10-update trials can be
    judged (warmup 2 + window 8)."""
    return testutil.tiny_run_config(
        data_dir, **{"deterministic": False, "health.trend_window": 8, **fields}
    )


@pytest.mark.slow  # Whole trials in-process: ~15 s.
def test_a_stopped_sweep_resumes_without_redoing_finished_trials(
    tmp_path, data_dir, monkeypatch, caplog
):
    """Preempted inside its 2nd trial (SIGTERM at update 5, after that trial's checkpoint):
    the rerun leaves the 1st trial alone and resumes the 2nd from its checkpoint."""
    config = _tiny(data_dir, checkpoint_every_steps=5)
    calls = []
    train_and_evaluate = lr_sweep.train.train_and_evaluate

    def counted(trial_config, workdir):
        calls.append(trial_config.lr.base)
        if len(calls) == 2:
            testutil.sigterm_at(monkeypatch, 5)
        return train_and_evaluate(trial_config, workdir)

    monkeypatch.setattr(lr_sweep.train, "train_and_evaluate", counted)
    with pytest.raises(preemption.Preempted):
        lr_sweep.run(config, str(tmp_path), base_lrs=[0.1, 0.4, 0.4000001], trial_steps=10)
    first = tmp_path / "lr_sweep" / "trials" / "lr_base_0.1" / lr_sweep.TRIAL_FILE
    finished = first.read_text()
    monkeypatch.undo()

    calls.clear()
    monkeypatch.setattr(lr_sweep.train, "train_and_evaluate", counted)
    with caplog.at_level(logging.INFO):
        sweep = lr_sweep.run(config, str(tmp_path), trial_steps=10)  # The grid comes from disk.
    assert calls == [0.4]  # 0.4000001 rounded to 0.4: one trial, not two.
    assert "resumed at step 5" in caplog.text
    assert first.read_text() == finished
    assert [t.base_lr for t in sweep.trials] == [0.1, 0.4]
    out = tmp_path / "lr_sweep"
    assert (out / "lr_sweep.png").read_bytes().startswith(testutil.PNG_MAGIC)
    table = (out / "lr_sweep.md").read_text()
    assert "| 0.1 |" in table and "| 0.4 |" in table
    saved = json.loads((out / "lr_sweep.json").read_text())
    assert len(saved["trials"]) == 2 and saved["trial_steps"] == 10
    assert not (tmp_path / "metrics.jsonl").exists()  # The run's own workdir is untouched.

    for changed, message in [
        ({"base_lrs": [0.2]}, r"--lrs \(started with \[0.1, 0.4\]\)"),
        ({"trial_steps": 12}, r"--trial_steps \(started with 10\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            lr_sweep.run(config, str(tmp_path), **{"trial_steps": 10, **changed})
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        lr_sweep.run(
            _tiny(data_dir, checkpoint_every_steps=5, seed=1), str(tmp_path), trial_steps=10
        )


@pytest.mark.slow  # Whole trials in-process: ~10 s.
def test_a_grid_around_the_range_test_and_an_exploding_trial(tmp_path, data_dir, monkeypatch):
    """Without --lrs the grid is the factors x the range test's suggestion (one range test); a
    trial whose loss goes NaN reads `explodes`, with no loss at the end, and is never the pick."""
    config = _tiny(data_dir)
    range_tests = []
    range_test = lr_sweep.lr_find.run
    monkeypatch.setattr(
        lr_sweep.lr_find, "run", lambda *a, **k: range_tests.append(1) or range_test(*a, **k)
    )
    sweep = lr_sweep.run(
        config,
        str(tmp_path),
        factors=(1.0, 1e12),
        trial_steps=10,
        range_test={"min_lr": 1e-3, "max_lr": 10.0, "num_steps": 30},
    )
    found = json.loads((tmp_path / "lr_find" / "lr_find.json").read_text())
    centre = found["suggested_base_lr"]
    assert [t.base_lr for t in sweep.trials] == [float(f"{centre * f:.4g}") for f in (1, 1e12)]
    assert range_tests == [1]
    exploded = sweep.trials[1]
    assert (exploded.verdict, exploded.end_loss) == ("explodes", math.inf)
    assert sweep.reading(exploded) == "explodes"
    saved = json.loads((tmp_path / "lr_sweep" / "lr_sweep.json").read_text())
    assert (saved["trials"][1]["end_loss"], saved["trials"][1]["reading"]) == (None, "explodes")
    assert saved["recommended_base_lr"] != exploded.base_lr
    # The grid came from factors: a rerun with others is refused (without another range test).
    with pytest.raises(ConfigError, match=r"--factors \(started with \[1.0, 1000000000000.0\]\)"):
        lr_sweep.run(config, str(tmp_path), factors=(1.0, 2.0), trial_steps=10)
    assert range_tests == [1]


def test_a_multi_worker_config_is_refused_before_it_waits_for_other_workers(tmp_path, data_dir):
    config = _tiny(data_dir, **{"distribution.strategy": "multi_worker"})
    with pytest.raises(ConfigError, match="lr_sweep runs on one worker: sweep on one host"):
        lr_sweep.run(config, str(tmp_path), base_lrs=[0.1], trial_steps=10)
    assert not (tmp_path / "lr_sweep").exists()


def test_trials_must_reach_the_peak_and_be_judged(tmp_path, data_dir):
    with pytest.raises(ConfigError, match=r"--trial_steps \(9\) must be at least the warmup \(2\)"):
        lr_sweep.run(_tiny(data_dir), str(tmp_path), base_lrs=[0.1], trial_steps=9)
    assert not (tmp_path / "lr_sweep").exists()


@pytest.mark.slow
def test_default_config_sweep_picks_an_lr_within_a_point_of_the_best(tmp_path, data_dir):
    """The command on the default config (float32, Mirrored over 2 logical CPUs as the stand-in
    for 2 GPUs; its own process, as a user runs it): too low is too slow, far too high is
    caught by the health rules, and the pick's eval accuracy is within 1 point of the best
    trial's."""
    command = testutil.main_command(
        tmp_path,
        "--config.distribution.strategy=mirrored",
        "--config.distribution.cpu_replicas=2",
        "--lrs=0.025,0.2,0.4,1.6",
        "--trial_steps=250",
        data_dir=data_dir,
        module="trainer.lr_sweep",
    )
    result = testutil.run_command(command, timeout=900)
    assert "lr_sweep | recommended lr.base: " in result.stderr
    saved = json.loads((tmp_path / "lr_sweep" / "lr_sweep.json").read_text())
    trials = {t["base_lr"]: t for t in saved["trials"]}
    assert trials[0.025]["reading"] == "too slow"
    assert trials[1.6]["reading"] in ("explodes", "stalls", "oscillates")
    pick = trials[saved["recommended_base_lr"]]
    assert pick["verdict"] in lr_sweep.TRAINABLE
    accuracy = {lr: t["eval_metrics"]["eval_accuracy"] for lr, t in trials.items()}
    assert max(accuracy.values()) > 0.9  # Far above chance (0.1): the comparison means something.
    assert accuracy[pick["base_lr"]] >= max(accuracy.values()) - 0.01
    # Reported for the real global batch (128 of reference 256, linear) and as lr.base.
    assert saved["recommended_peak_lr"] == pytest.approx(saved["recommended_base_lr"] / 2)


@pytest.mark.parametrize("name", ["default", "adamw_sqrt", "imagenet_resnet50"])
def test_every_shipped_config_gives_valid_trials(name):
    """The ResNet-50 recipe's piecewise boundaries (epochs 30/60/80) would fall beyond a
    default-length trial if they did not shrink with it."""
    config = importlib.import_module(f"configs.{name}").get_config()
    plan = plan_lib.make_plan(config, num_replicas=8, num_workers=1, train_examples=1_281_167)
    window = config.health.trend_window
    steps = lr_sweep.default_trial_steps(plan.warmup_steps, plan.total_steps, window)
    trial = lr_sweep.trial_config(config, plan, config.lr.base, steps)
    lr_sweep._check_trial(trial, plan)
    if config.lr.decay == "piecewise":  # Each boundary inside the trial's decay, in order.
        boundaries = list(trial.lr.boundaries)
        assert plan.warmup_steps < boundaries[0] and boundaries[-1] < steps
        assert boundaries == sorted(set(boundaries)) and len(boundaries) == len(plan.boundaries)

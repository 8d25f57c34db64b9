"""Tests for trainer/health: each rule fires on its synthetic case, and only there."""

import glob
import json
import signal

import numpy as np
import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer import health, learning_rate, loop, metrics, preemption
from trainer import plan as plan_lib
from trainer.errors import ConfigError, UserError
from trainer.health import report

N = 400
RULES = health.Rules.from_config(default_config.get_config().health)


def _run(loss=None, lr=None, update_per_lr=None, grad=None, n=N, seed=0):
    """A synthetic history: by default a healthy run (loss decaying with 5% noise, 20 updates of
    warmup to LR 0.1, update ratio ~1e-3 that follows the LR)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    if loss is None:
        loss = (2.3 * np.exp(-t / 150) + 0.3) * (1 + 0.05 * rng.standard_normal(n))
    if lr is None:
        lr = 0.1 * np.minimum((t + 1) / 20, 1.0)
    if grad is None:
        grad = 1.0 + 0.1 * rng.standard_normal(n)
    if update_per_lr is None:
        update_per_lr = 0.2 * (1 + 0.1 * rng.standard_normal(n))
    return {
        "step": t + 1,
        "loss": np.asarray(loss, float),
        "grad_norm": np.asarray(grad, float),
        "param_norm": np.full(n, 20.0),
        "update_norm": np.asarray(lr, float) * update_per_lr,
        "learning_rate": np.asarray(lr, float),
        "skipped": np.zeros(n),
    }


def _healthy_loss(seed=0):
    return _run(seed=seed)["loss"]


def _with(values, at, factor):
    values = values.copy()
    values[at] *= factor
    return values


def _flat(level, noise, seed=1):
    return level * (1 + noise * np.random.default_rng(seed).standard_normal(N))


_T = np.arange(N)
# (case, history, expected kinds, step of the first event or None)
CASES = [
    ("healthy decrease", _run(), set(), None),
    ("healthy, another seed", _run(seed=3), set(), None),
    (
        "single loss spike",
        _run(loss=_with(_healthy_loss(), 250, 8.0), grad=_with(_run()["grad_norm"], 250, 8.0)),
        {"spike"},
        251,
    ),
    ("gradient-norm spike alone", _run(grad=_with(_run()["grad_norm"], 300, 10.0)), {"spike"}, 301),
    (
        "sustained explosion",
        _run(loss=np.where(_T < 250, _healthy_loss(), 0.8 * 1.5 ** np.minimum(_T - 249, 30))),
        {"spike", "explode"},
        None,
    ),
    ("NaN loss", _run(loss=_with(_healthy_loss(), 200, np.nan)), {"explode"}, 201),
    ("plateau at a healthy LR", _run(loss=_flat(1.5, 0.02)), {"stall"}, None),
    (
        "plateau at a near-zero LR",
        _run(loss=_flat(1.5, 0.02), lr=np.full(N, 1e-5)),
        {"stall"},
        None,
    ),
    (
        "plateau at the end of a decay to 0",
        _run(
            loss=np.where(_T < 200, _healthy_loss(), _flat(0.6, 0.02)),
            lr=0.1 * np.clip((200 - _T) / 100, 1e-4, 1),
        ),
        set(),
        None,
    ),
    ("oscillation", _run(loss=_flat(2.0, 0.3)), {"oscillate"}, None),
    (
        "updates far too large, loss flat",
        _run(loss=_flat(2.3, 0.02), update_per_lr=np.full(N, 500.0)),
        {"oscillate"},
        None,
    ),
    (
        "LR x0.1 at a milestone, applied",
        _run(lr=np.where(_T < 200, 0.1, 0.01)),
        set(),
        None,
    ),
    (
        "LR x0.1 at a milestone, update unchanged",
        _run(
            lr=np.where(_T < 200, 0.1, 0.01),
            update_per_lr=np.where(_T < 200, 0.2, 2.0),
        ),
        {"lr_not_applied"},
        200 + RULES.lr_transient + RULES.lr_window,
    ),
]


@pytest.mark.parametrize(
    ("history", "kinds", "first"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_detector_fires_on_its_case_and_only_there(history, kinds, first):
    events = health.detect(history, RULES, lambda step: f"update {step}")
    assert {e.kind for e in events} == kinds, [e.message for e in events]
    if first is not None:
        assert events[0].step == first
    for event in events:  # What was seen, where, what to do.
        assert f"update {event.step}" in event.message and ": " in event.message
        assert event.learning_rate == pytest.approx(history["learning_rate"][event.step - 1])


def test_each_detection_is_reported_once_per_episode():
    loss = _healthy_loss()
    for at in (200, 205, 210, 350):  # Three spikes within one window, then one much later.
        loss[at] *= 8
    events = health.detect(_run(loss=loss), RULES, str)
    assert [(e.kind, e.step) for e in events] == [("spike", 201), ("spike", 351)]


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_monitor_reports_the_same_in_chunks_and_after_a_replay(chunk):
    history = CASES[2][1]
    whole = health.detect(history, RULES, str)
    monitor = health.Monitor(RULES, str)
    chunked = []
    for start in range(0, N, chunk):
        chunked += monitor.observe({k: v[start : start + chunk] for k, v in history.items()})
    assert chunked == whole
    resumed = health.Monitor(RULES, str)  # A resume at update 240: replay, then go on.
    resumed.replay({k: v[:240] for k, v in history.items()})
    assert resumed.observe({k: v[240:] for k, v in history.items()}) == whole


@pytest.mark.parametrize(
    ("case", "verdict"),
    [
        ("healthy decrease", "healthy"),
        ("single loss spike", "spikes"),
        ("gradient-norm spike alone", "spikes"),
        ("NaN loss", "explodes"),
        ("sustained explosion", "explodes"),
        ("oscillation", "oscillates"),
        ("plateau at a healthy LR", "stalls"),
        ("LR x0.1 at a milestone, update unchanged", "healthy"),
    ],
)
def test_classify_a_whole_run(case, verdict):
    history = next(c[1] for c in CASES if c[0] == case)
    assert health.classify(health.detect(history, RULES, str)) == verdict


def test_suggestions_follow_the_cause():
    def message(case):
        history = next(c[1] for c in CASES if c[0] == case)
        return health.detect(history, RULES, str)[0].message

    assert "raise lr.base" in message("plateau at a near-zero LR")
    assert "too small" in message("plateau at a near-zero LR")
    assert "lower lr.base" in message("updates far too large, loss flat")
    assert "lower lr.base" in message("oscillation")
    assert "did not apply" in message("LR x0.1 at a milestone, update unchanged")


@pytest.mark.parametrize(
    ("step", "phase"),
    [
        (10, "warmup step 10 of 50"),
        (50, "warmup step 50 of 50"),
        (60, "at the peak, 10 steps after warmup ended"),
        (325, "cosine decay, 50% through"),
    ],
)
def test_the_schedule_describes_the_phase_for_the_advice(step, phase):
    schedule = learning_rate.WarmupDecaySchedule(
        peak_lr=0.1, total_steps=600, warmup_steps=50, decay_kind="cosine"
    )
    assert schedule.phase(step) == phase


def test_spike_guard_decides_like_the_rule():
    """The in-graph guard (loop.SpikeGuard) skips exactly the updates spike_flags flags."""
    history = _run(loss=_with(_healthy_loss(), 150, 8.0), grad=_with(_run()["grad_norm"], 300, 9))
    guard = loop.SpikeGuard(window=128, sigma=6.0, min_history=64, skip=True)
    observe = tf.function(guard.observe)
    kept = [
        bool(observe(tf.constant(loss, tf.float32), tf.constant(grad, tf.float32)))
        for loss, grad in zip(history["loss"], history["grad_norm"], strict=True)
    ]
    flags = health.spike_flags(history["loss"], 128, 6.0, 64) | health.spike_flags(
        history["grad_norm"], 128, 6.0, 64
    )
    assert np.flatnonzero(flags).tolist() == [150, 300]
    assert kept == (~flags).tolist()
    assert int(guard.skipped.numpy()) == 2
    assert bool(observe(tf.constant(np.nan), tf.constant(1.0))) is False  # Never applied.


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("action", "ignore"),
        ("min_history", 500),
        ("ratio", 1.0),
        ("update_ratio_low", 0.5),
        ("rollback_lr_factor", 1.5),
        ("trend_window", 4),
    ],
)
def test_bad_health_config_is_refused_naming_the_field(field, value):
    config = testutil.config_with(**{f"health.{field}": value})
    with pytest.raises(ConfigError, match=f"health.{field}"):
        health.check_config(config.health)


def test_report_from_the_files_of_a_run(tmp_path):
    history = CASES[2][1]
    with open(tmp_path / "health_steps.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({k: float(v[i]) for k, v in history.items()}) + "\n")
    events = health.detect(history, RULES, str)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 50, "loss": 1.0}) + "\n")
        for event in events:
            f.write(json.dumps({"step": event.step, "kind": "health", **event.record()}) + "\n")
    summary = report.write(str(tmp_path))
    assert summary["verdict"] == "spikes"
    assert summary["updates"] == N and summary["last_step"] == N
    assert [e["step"] for e in summary["events"]] == [251]
    assert json.loads((tmp_path / "health.json").read_text()) == summary
    assert (tmp_path / "health.png").read_bytes().startswith(testutil.PNG_MAGIC)


# ---------------------------------------------------------------------------------------------
# End to end (slow): the real trainer in subprocesses.

SHORT = (  # A small MLP run, for the LR and action cases.
    "--config.model.name=mlp",
    "--config.total_steps=120",
    "--config.eval_every_steps=1000",
    "--config.checkpoint_every_steps=1000",
)


def _health_events(workdir) -> list[dict]:
    return [r for r in metrics.read_records(str(workdir)) if r.get("kind") == "health"]


def _run_spiked(workdir, *overrides, data_dir, update, hold_at_step=None):
    """Starts the trainer through tests/spike_injection.py: the loss of `update` spikes (once)."""
    return testutil.start_main(
        workdir,
        *overrides,
        f"--spike_at_update={update}",
        data_dir=data_dir,
        module="spike_injection",
        hold_at_step=hold_at_step,
    )


def _finish(process, expect=0):
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == expect, stderr[-4000:]
    return stderr


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, data_dir):
    """The real default config (small CNN, SGD momentum, warmup + cosine) at 200 steps."""
    workdir = tmp_path_factory.mktemp("default")
    result = testutil.run_main(
        workdir,
        "--config.total_steps=200",
        "--config.eval_every_steps=100",
        data_dir=data_dir,
        timeout=1500,  # ~60 s on an idle 2-core machine; a loaded one took over 600.
    )
    return workdir, result.stderr


@pytest.mark.slow
def test_default_config_reports_nothing(default_run):
    workdir, stderr = default_run
    assert _health_events(workdir) == []
    summary = json.loads((workdir / "health.json").read_text())
    assert summary["verdict"] == "healthy" and summary["updates"] == 200
    assert (workdir / "health.png").read_bytes().startswith(testutil.PNG_MAGIC)
    assert "health | healthy | updates: 200" in stderr
    train = [r for r in metrics.read_records(str(workdir)) if "loss" in r]
    for key in ("grad_norm", "param_norm", "update_ratio", "loss_max", "skipped_updates"):
        assert all(key in r for r in train), key  # Today's keys stay, the health ones join.
    assert all(r["loss_max"] >= r["loss"] and r["skipped_updates"] == 0 for r in train)


@pytest.mark.slow
def test_tensorboard_has_train_and_eval_runs_and_every_warmup_lr(default_run):
    workdir, _ = default_run
    runs = {}
    for run in ("", "train", "eval"):
        for path in glob.glob(str(workdir / "tensorboard" / run / "events.out.tfevents.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    runs.setdefault(run, {}).setdefault(value.tag, []).append(event.step)
    assert {"metrics/loss", "metrics/accuracy", "lr/learning_rate", "health/grad_norm"} <= set(
        runs["train"]
    )
    assert {"metrics/loss", "metrics/accuracy"} == set(runs["eval"])  # Same tags: they overlay.
    assert runs["eval"]["metrics/loss"] == [100, 200]
    assert runs["train"]["lr/learning_rate"] == list(range(1, 201))  # Warmup (50) included.
    assert runs["train"]["metrics/loss"] == list(range(1, 201))
    assert runs[""]["lr/learning_rate"][:50] == list(range(1, 51))  # The plan, under that tag.


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lr_base", "kinds", "advice"),
    [
        (10.0, {"explode", "oscillate"}, "lower lr.base"),  # 50x the default 0.2.
        (0.0002, {"stall"}, "raise lr.base"),  # 1000x below it.
    ],
    ids=["50x_too_high", "1000x_too_low"],
)
def test_a_wrong_lr_is_reported_with_advice(tmp_path, data_dir, lr_base, kinds, advice):
    result = testutil.run_main(tmp_path, *SHORT, f"--config.lr.base={lr_base}", data_dir=data_dir)
    events = _health_events(tmp_path)
    assert events and {e["health"] for e in events} <= kinds | {"stall"}, events
    first = events[0]
    assert first["health"] in kinds and advice in first["message"], first
    assert f"health | step: {first['step']} | {first['health']}" in result.stderr
    assert "lr=" in first["message"] and ("warmup" in first["message"] or "%" in first["message"])


SKIP = (
    *SHORT,
    "--config.health.action=skip",
    "--config.steps_per_loop=5",
    "--config.log_every_steps=5",
)
SPIKE_AT = 90  # After the guard's 64 updates of history.
TWO = ("--config.distribution.strategy=mirrored", "--config.distribution.cpu_replicas=2")


def _check_skipped(workdir):
    steps = metrics.read_steps(str(workdir))
    at = SPIKE_AT - 1
    assert steps["skipped"].tolist() == [float(i == at) for i in range(len(steps["step"]))]
    assert steps["update_norm"][at] == 0.0 and steps["loss"][at] > 10 * steps["loss"][at - 1]
    assert (steps["update_norm"][at + 1 :] > 0).all()
    (event,) = [e for e in _health_events(workdir) if e["step"] == SPIKE_AT]
    assert event["health"] == "spike" and "(update skipped)" in event["message"]
    assert testutil.logged(workdir, "skipped_updates")[-1] == (120, 1)


@pytest.fixture(scope="module")
def skipped_straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("skip_straight")
    _finish(_run_spiked(workdir, *SKIP, *TWO, data_dir=data_dir, update=SPIKE_AT))
    return workdir


@pytest.mark.slow
def test_skip_drops_an_injected_spike_on_1_replica(tmp_path, data_dir):
    _finish(_run_spiked(tmp_path, *SKIP, data_dir=data_dir, update=SPIKE_AT))
    _check_skipped(tmp_path)


@pytest.mark.slow
def test_skip_on_2_replicas_and_a_sigterm_after_it_resumes_bitwise(
    skipped_straight, tmp_path, data_dir
):
    _check_skipped(skipped_straight)
    process = _run_spiked(
        tmp_path, *SKIP, *TWO, data_dir=data_dir, update=SPIKE_AT, hold_at_step=SPIKE_AT + 15
    )
    testutil.wait_for_step(tmp_path, SPIKE_AT + 5, process)
    process.send_signal(signal.SIGTERM)
    _finish(process, expect=preemption.EXIT_CODE_PREEMPTED)
    _finish(_run_spiked(tmp_path, *SKIP, *TWO, data_dir=data_dir, update=SPIKE_AT))
    testutil.assert_bitwise_equal(skipped_straight, tmp_path, 120, has_dropout=False)
    assert metrics.read_steps(str(tmp_path))["step"].tolist() == list(range(1, 121))
    _check_skipped(tmp_path)


@pytest.mark.slow
def test_rollback_restores_the_last_checkpoint_and_lowers_the_lr(tmp_path, data_dir):
    overrides = (
        *SHORT[:-1],
        "--config.checkpoint_every_steps=50",
        "--config.health.action=rollback",
        "--config.steps_per_loop=10",
        "--config.log_every_steps=10",
    )
    _finish(_run_spiked(tmp_path, *overrides, data_dir=data_dir, update=SPIKE_AT))
    (event,) = [e for _, e in testutil.logged(tmp_path, "lr_event")]
    assert f"health rollback: spike at step {SPIKE_AT}" in event
    assert testutil.logged(tmp_path, "lr_event")[0][0] == 50  # Back at the checkpoint.
    steps = metrics.read_steps(str(tmp_path))
    assert steps["step"].tolist() == list(range(1, 121))  # Updates 51-90 redone, once each.
    reference = testutil.config_with(total_steps=120, **{"model.name": "mlp"})
    plan = plan_lib.make_plan(reference, num_replicas=1, num_workers=1, train_examples=12000)
    planned = learning_rate.planned_curve(plan, reference.lr)
    np.testing.assert_allclose(steps["learning_rate"][:50], planned[:50], rtol=1e-5)
    np.testing.assert_allclose(steps["learning_rate"][50:], 0.5 * np.array(planned[50:]), rtol=1e-5)


def test_cli_renders_the_report_and_refuses_an_empty_workdir(tmp_path, capsys):
    from trainer.health import __main__ as cli_main

    history = CASES[0][1]
    with open(tmp_path / "health_steps.jsonl", "w") as f:
        for i in range(N):
            f.write(json.dumps({k: float(v[i]) for k, v in history.items()}) + "\n")
    png = tmp_path / "elsewhere.png"
    testutil.run_cli_in_process(cli_main.main, f"--workdir={tmp_path}", f"--png={png}")
    assert json.loads((tmp_path / "health.json").read_text())["verdict"] == "healthy"
    assert png.read_bytes().startswith(testutil.PNG_MAGIC)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no run"):
        testutil.run_cli_in_process(cli_main.main, f"--workdir={empty}")

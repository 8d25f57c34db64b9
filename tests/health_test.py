"""Tests for trainer/health: each rule fires on its synthetic case, and only there."""

import json

import numpy as np
import pytest
import tensorflow as tf
import testutil

from configs import default as default_config
from trainer import health, loop
from trainer.errors import ConfigError
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
def test_describe_phase(step, phase):
    assert health.describe_phase(step, 50, 600, "cosine") == phase


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
    assert summary["verdict"] == "explodes"
    assert summary["updates"] == N and summary["last_step"] == N
    assert [e["step"] for e in summary["events"]] == [251]
    assert json.loads((tmp_path / "health.json").read_text()) == summary
    assert (tmp_path / "health.png").read_bytes().startswith(testutil.PNG_MAGIC)

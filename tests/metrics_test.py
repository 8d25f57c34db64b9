"""Tests for trainer/metrics.py: JSONL + TensorBoard records, per-update signals, health events,
resume truncation, the LR curve."""

import glob
import json
import logging
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from trainer import loop, metrics

RECORDS = [
    (10, {"loss": 2.5, "accuracy": 0.125, "learning_rate": 0.1}),
    (20, {"loss": 1.75, "accuracy": 0.5, "learning_rate": 0.05, "examples": 2560}),
    (30, {"loss": 1.0, "accuracy": 0.75, "learning_rate": 0.025, "phase": "decay"}),
]


def _events(workdir, run=""):
    """(plugin, tag, step, value, description) of every summary in a TensorBoard run."""
    pattern = os.path.join(workdir, "tensorboard", run, "events.out.tfevents.*")
    found = []
    for path in sorted(glob.glob(pattern)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                plugin = value.metadata.plugin_data.plugin_name
                description = value.metadata.summary_description
                found.append((plugin, value.tag, event.step, array.item(), description))
    return found


def _scalars(workdir, tag, run="train"):
    return [(step, value) for _, t, step, value, _ in _events(workdir, run) if t == tag]


def _descriptions(workdir, run):
    return {tag: d for _, tag, _, _, d in _events(workdir, run) if d}


def _writer(workdir, resume_step=0, enabled=True):
    return metrics.MetricWriter(
        str(workdir),
        enabled=enabled,
        total_steps=100,
        resume_step=resume_step,
        task_metrics=("accuracy",),
    )


def test_write_jsonl_and_tensorboard(tmp_path):
    writer = _writer(tmp_path)
    for step, record in RECORDS:
        writer.write(step, record)
    writer.write(30, {"eval_loss": 0.5, "eval_accuracy": 0.875}, kind="eval")
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    expected = [{"step": s, **r} for s, r in RECORDS] + [
        {"step": 30, "eval_loss": 0.5, "eval_accuracy": 0.875}
    ]
    assert [json.loads(line) for line in lines] == expected
    assert metrics.read_records(str(tmp_path)) == expected
    # Train and eval are two runs with the same tags, so their curves overlay.
    points = _scalars(str(tmp_path), "metrics/accuracy")
    assert [step for step, _ in points] == [step for step, _ in RECORDS]
    np.testing.assert_allclose([v for _, v in points], [r["accuracy"] for _, r in RECORDS])
    assert _scalars(str(tmp_path), "metrics/accuracy", run="eval") == [(30, 0.875)]
    assert _scalars(str(tmp_path), "metrics/loss", run="eval") == [(30, 0.5)]
    # Loss and LR are written per update by write_steps, not as window means here.
    assert _scalars(str(tmp_path), "metrics/loss") == []
    assert _scalars(str(tmp_path), "lr/learning_rate") == []
    assert _scalars(str(tmp_path), "examples") == [(20, 2560)]  # Unlisted keys keep their name.
    assert _scalars(str(tmp_path), "phase") == []  # Not a number: JSONL only.
    assert "whole eval split" in _descriptions(str(tmp_path), "eval")["metrics/loss"]
    assert "trainer/task.py" in _descriptions(str(tmp_path), "train")["metrics/accuracy"]


def test_every_tag_has_a_description_with_its_group():
    for key, (tag, description) in metrics.TAGS.items():
        assert "/" in tag and len(description) > 20, key
    assert metrics.TAGS["loss"][0] == metrics.TAGS["eval_loss"][0]


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        ("top2", "metrics/top2"),  # A task metric's train value...
        ("eval_top2", "metrics/top2"),  # ...and its eval share the tag (two runs overlay).
        ("ema_eval_top2", "metrics/ema_top2"),
        ("ema_eval_loss", "metrics/ema_loss"),
        ("eval_other", "eval_other"),  # Not a task metric: the key as it is.
        ("loss_scale", "loss_scale"),
    ],
)
def test_task_metrics_get_their_tags_from_their_names(key, tag):
    assert metrics._tag(key, task_metrics=("top2",))[0] == tag


def _steps(first, n, seed=0):
    rng = np.random.default_rng(seed)
    steps = rng.uniform(0.5, 2.0, size=(n, len(loop.SIGNALS))).astype(np.float32)
    steps[:, loop.SIGNALS.index("skipped")] = 0
    return steps


def test_write_steps_one_record_and_one_point_per_update(tmp_path):
    writer = _writer(tmp_path)
    first, second = _steps(1, 50), _steps(51, 7, seed=1)
    writer.write_steps(1, first)
    writer.write_steps(51, second)
    writer.close()
    both = np.concatenate([first, second])
    records = metrics.read_records(str(tmp_path), metrics.STEPS_FILE)
    assert [r["step"] for r in records] == list(range(1, 58))
    read = metrics.read_steps(str(tmp_path))
    for i, name in enumerate(loop.SIGNALS):
        np.testing.assert_allclose(read[name], both[:, i], rtol=1e-6)
    column = {name: both[:, i] for i, name in enumerate(loop.SIGNALS)}
    column["update_ratio"] = column["update_norm"] / column["param_norm"]
    descriptions = _descriptions(str(tmp_path), "train")
    for name in metrics.PER_STEP:
        tag = metrics.TAGS[name][0]
        points = _scalars(str(tmp_path), tag)
        assert [s for s, _ in points] == list(range(1, 58)), name
        np.testing.assert_allclose([v for _, v in points], column[name], rtol=1e-5)
        assert descriptions[tag] == metrics.TAGS[name][1]


def test_write_event_goes_to_jsonl_tensorboard_and_console(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    writer = _writer(tmp_path)
    event = {"health": "explode", "message": "loss rose 12x", "learning_rate": 0.8}
    writer.write_event(60, event, marker=2.0)
    writer.close()
    assert metrics.read_records(str(tmp_path)) == [{"step": 60, "kind": "health", **event}]
    found = _events(str(tmp_path), "train")
    assert ("text", "health/events", 60, b"explode: loss rose 12x") in [f[:4] for f in found]
    assert _scalars(str(tmp_path), "health/event") == [(60, 2.0)]
    assert "health | step: 60 | explode | loss rose 12x" in caplog.text


def test_progress_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="absl")  # absl.app (other tests) leaves it at WARNING.
    writer = _writer(tmp_path)
    writer.write(10, {"loss": 0.5, "accuracy": 0.25})
    writer.write(20, {"eval_loss": 0.75}, kind="eval")
    writer.close()
    lines = [r.getMessage() for r in caplog.records if " | step: " in r.getMessage()]
    assert lines[0].startswith("train | step: 10/100 | steps/sec: ")
    assert lines[0].endswith("| loss: 0.5 | accuracy: 0.25")
    assert lines[1] == "eval | step: 20/100 | eval_loss: 0.75"


def test_write_text(tmp_path):
    writer = _writer(tmp_path)
    writer.write_text("plan", "plan | replicas: 2", step=0)
    writer.close()
    texts = [(t, s, v) for plugin, t, s, v, _ in _events(str(tmp_path)) if plugin == "text"]
    assert texts == [("plan", 0, b"plan | replicas: 2")]


@pytest.mark.parametrize(
    ("resume_step", "kept"),
    [
        (0, []),
        (20, [10, 20]),
        (35, [10, 20, 30]),
        (50, [10, 20, 30, 40, 50]),
        (90, [10, 20, 30, 40, 50]),
    ],
)
def test_resume_drops_records_after_the_restored_step(tmp_path, resume_step, kept):
    first = _writer(tmp_path)
    for step in (10, 20, 30, 40, 50):
        first.write(step, {"loss": 1.0, "run": 1})
    first.write_steps(1, _steps(1, 50))
    first.close()  # "Crash" after step 50; the last checkpoint was at resume_step.
    second = _writer(tmp_path, resume_step=resume_step)
    assert [r["step"] for r in metrics.read_records(str(tmp_path))] == kept
    assert metrics.read_steps(str(tmp_path))["step"].tolist() == list(range(1, 51))[:resume_step]
    redo = [s for s in (10, 20, 30, 40, 50, 60) if s > resume_step]
    for step in redo:
        second.write(step, {"loss": 0.5, "run": 2})
    second.close()
    records = metrics.read_records(str(tmp_path))
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps))  # Each step once, in order.
    assert steps == kept + redo
    assert [r["run"] for r in records] == [1] * len(kept) + [2] * len(redo)


GOOD = b'{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n'


@pytest.mark.parametrize(
    "torn",
    [
        b'{"step": 30, "lo',  # Cut mid-record, no newline.
        b'{"step": 30, "lo\n',  # Cut, with a newline (last line, still not JSON).
        b'{"step": 30, "loss": 0.2}'[:-1] + b"\n\n",  # Blank lines after it.
        b"\x00" * 16,  # Zero-filled tail: what some filesystems leave after a power loss.
        b'{"step": 30, "name": "\xe2\x82',  # Cut inside a multi-byte character.
    ],
    ids=["no_newline", "newline", "blank_lines_after", "zero_filled", "cut_utf8"],
)
def test_resume_drops_a_torn_last_line(tmp_path, caplog, torn):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + torn)
    caplog.set_level(logging.WARNING)
    assert metrics.read_records(str(tmp_path)) == [
        {"step": 10, "loss": 1.0},
        {"step": 20, "loss": 0.5},
    ]
    assert path.read_bytes() == GOOD + torn  # Reading does not change the file.
    caplog.clear()
    writer = _writer(tmp_path, resume_step=30)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "line 3" in warnings[0]
    assert path.read_bytes() == GOOD  # Rewritten without the torn line...
    writer.write(30, {"loss": 0.25})
    writer.close()
    assert path.read_bytes() == GOOD + b'{"step": 30, "loss": 0.25}\n'  # ...and resumed.


@pytest.mark.parametrize(
    ("content", "line"),
    [
        (b'{"step": 10}\n{"step": 20, "lo\n{"step": 30}\n', 2),
        (b'{"step": 10}\n{"step": 20, "lo{"step": 30}\n{"step": 40}', 2),  # Glued records.
        (b'\n{"step": 10}\n\n{"st\n{"step": 20}\n', 4),  # Blank lines still count.
        (b'{"step": 10}\n{"step": 20, "lo\n{"step": 30, "lo', 2),  # Two torn lines: not a crash.
        (b'{"loss": 1.0}\n{"step": 20}\n', 1),  # JSON, but not a record.
        (b'{"step": 10}\n[20]\n{"step": 30}\n', 2),
    ],
    ids=["cut", "glued", "blank_lines_count", "two_torn", "no_step", "not_a_dict"],
)
def test_corruption_before_the_last_line_is_refused(tmp_path, content, line):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    for load in (
        lambda: metrics.read_records(str(tmp_path)),
        lambda: _writer(tmp_path, resume_step=10),
    ):
        with pytest.raises(metrics.MetricsFileError) as raised:
            load()
        message = str(raised.value)
        assert isinstance(raised.value, ValueError)  # main.py shows it as one "error:" line.
        assert "\n" not in message
        assert f"{path} line {line}:" in message
        assert "fix or remove that line, or move metrics.jsonl away" in message
    assert path.read_bytes() == content  # Left as it was for the user to look at.


@pytest.mark.parametrize("resume_step", [10, 20])
def test_last_line_without_newline_gets_one_before_the_next_record(tmp_path, resume_step):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 10, "loss": 1.0}')  # A crash cut only the newline.
    writer = _writer(tmp_path, resume_step=resume_step)
    writer.write(20, {"loss": 0.5})
    writer.close()
    assert path.read_bytes() == b'{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n'
    assert metrics.read_records(str(tmp_path)) == [
        {"step": 10, "loss": 1.0},
        {"step": 20, "loss": 0.5},
    ]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = _writer(tmp_path, enabled=False)
    writer.write(10, {"loss": 1.0})
    writer.write_text("plan", "text")
    writer.write_lr_curve([0.1, 0.2, 0.3])
    writer.write_steps(1, _steps(1, 3))
    writer.write_event(3, {"health": "stall", "message": "flat", "learning_rate": 0.1}, 3.0)
    writer.close()
    assert os.listdir(tmp_path) == []


def test_disabled_writer_leaves_existing_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 50, "loss": 1.0}\n')
    writer = _writer(tmp_path, resume_step=10, enabled=False)
    writer.write(60, {"loss": 0.5})
    writer.close()
    assert metrics.read_records(str(tmp_path)) == [{"step": 50, "loss": 1.0}]


def test_lr_curve_short_is_written_in_full(tmp_path):
    curve = [0.1 * (1 + np.cos(np.pi * i / 50)) / 2 for i in range(50)]
    writer = _writer(tmp_path)
    writer.write_lr_curve(curve)
    writer.close()
    points = _scalars(str(tmp_path), "lr/learning_rate", run="")  # The applied LR's tag.
    assert [step for step, _ in points] == list(range(1, 51))  # curve[i] is update i + 1.
    np.testing.assert_allclose([v for _, v in points], curve, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("length", [1, 2, 999, 1000, 1001, 2999, 100_000])
def test_lr_curve_long_is_subsampled(tmp_path, length):
    # value == step / length exactly where written, so each point is checked against its step.
    curve = [(i + 1) / length for i in range(length)]
    writer = _writer(tmp_path)
    start = time.monotonic()
    writer.write_lr_curve(curve)
    elapsed = time.monotonic() - start
    writer.close()
    points = _scalars(str(tmp_path), "lr/learning_rate", run="")
    steps = [step for step, _ in points]
    assert len(steps) <= 1000
    if length <= 1000:
        assert steps == list(range(1, length + 1))
    assert steps[0] == 1 and steps[-1] == length  # First and last kept.
    gaps = np.diff(steps)
    assert (gaps > 0).all()
    if len(gaps) > 1:
        assert len(set(gaps[:-1].tolist())) == 1  # Evenly strided up to the last point.
        assert len(steps) >= 500  # ...and not thinned more than needed.
    np.testing.assert_allclose([v for _, v in points], np.array(steps) / length, rtol=1e-6)
    assert elapsed < 15  # Writing all 100k points took ~65 s on 2 cores.

"""What users build job scripts on: LR changes that survive crashes, never a silent fresh start,
exit 42 on any signal, config changes on resume said out loud, and full disks reported in one line.

Most runs here are in-process (`train_and_evaluate`, default strategy, a tiny MLP): a "crash" is
an exception raised from inside the run, which leaves the workdir as kill -9 would.
"""

import json
import logging
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
import testutil

from trainer import checkpointing, metrics, preemption, train
from trainer.errors import ConfigError

pytestmark = pytest.mark.slow

WARMUP = 4


def _config(data_dir, **fields):
    return testutil.tiny_run_config(data_dir, **{"lr.warmup_steps": WARMUP, **fields})


def _cosine(update, total, peak=0.1):
    """The default schedule (linear warmup, cosine to 0) at 1-based `update`, by hand."""
    if update <= WARMUP:
        return peak * update / WARMUP
    return peak * 0.5 * (1 + np.cos(np.pi * (update - WARMUP) / (total - WARMUP)))


# ---------------------------------------------------------------------------------------------
# 1-2. The manual override: durable once applied, accepted in any BOM-marked encoding.


def test_applied_override_survives_a_crash_before_the_next_checkpoint(
    tmp_path, data_dir, monkeypatch
):
    config = _config(data_dir, total_steps=60, checkpoint_every_steps=50)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "lr_override.json").write_text('{"set": 0.01}')  # Applied at step 5.
    testutil.crash_at(monkeypatch, 30)
    with pytest.raises(testutil.Crash):
        train.train_and_evaluate(config, str(tmp_path))
    monkeypatch.undo()
    assert not (tmp_path / "lr_override.json").exists()
    assert (tmp_path / "lr_override.applied-5.json").exists()
    train.train_and_evaluate(config, str(tmp_path))
    events = [e for _, e in testutil.logged(tmp_path, "lr_event")]
    assert len(events) == 1 and "manual override" in events[0]
    # Every update after the override follows it: 0.01 at update 6, the cosine scaled from there.
    for step, lr in testutil.logged(tmp_path, "learning_rate"):
        expected = _cosine(step, 60) if step <= 5 else 0.01 * _cosine(step, 60) / _cosine(6, 60)
        assert lr == pytest.approx(expected, rel=1e-5), step


@pytest.mark.parametrize(
    ("encoding", "applied"),
    [
        ("utf-8", True),
        ("utf-8-sig", True),
        ("utf-16", True),
        ("utf-16-be-bom", True),
        (None, False),
    ],
)
def test_override_file_encodings(tmp_path, data_dir, encoding, applied):
    text = '{"multiply": 0.5}'
    if encoding == "utf-16-be-bom":
        raw = b"\xfe\xff" + text.encode("utf-16-be")
    elif encoding:
        raw = text.encode(encoding)
    else:
        raw = b"\xff\xfe\xff\x00garbage"  # Undecodable: rejected, reported, training goes on.
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "lr_override.json").write_bytes(raw)
    train.train_and_evaluate(_config(data_dir), str(tmp_path))
    (event,) = [e for _, e in testutil.logged(tmp_path, "lr_event")]
    assert testutil.logged(tmp_path, "loss")[-1][0] == 20  # The run went on to the end.
    lrs = dict(testutil.logged(tmp_path, "learning_rate"))
    if applied:
        assert "manual override" in event and (tmp_path / "lr_override.applied-5.json").exists()
        assert lrs[10] == pytest.approx(0.5 * _cosine(10, 20), rel=1e-5)
    else:
        assert str(tmp_path / "lr_override.json") in event
        assert (tmp_path / "lr_override.rejected-5.json").read_bytes() == raw
        assert lrs[10] == pytest.approx(_cosine(10, 20), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 4-5. History is never silently restarted or blocked by a torn line.


def test_history_without_checkpoints_is_refused_and_kept(tmp_path, data_dir):
    config = _config(data_dir)
    train.train_and_evaluate(config, str(tmp_path))
    before = (tmp_path / "metrics.jsonl").read_text()
    for path in (tmp_path / "checkpoints").iterdir():
        path.unlink()
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "metrics.jsonl" in message and "no checkpoint" in message and "new --workdir" in message
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not list((tmp_path / "checkpoints").iterdir())  # Nothing written either.


def test_torn_last_metrics_line_does_not_block_resuming(tmp_path, data_dir):
    train.train_and_evaluate(_config(data_dir, total_steps=10), str(tmp_path))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "loss": 0.')
    train.train_and_evaluate(_config(data_dir), str(tmp_path))
    assert [s for s, _ in testutil.logged(tmp_path, "loss")] == [5, 10, 15, 20]


# ---------------------------------------------------------------------------------------------
# 8. Config changes on resume: logged, refused where they break the data order, "nothing to do".

# (changed fields on resume of a finished 10-step run, expected change lines, optimizer steps at
# the end, "nothing to do" expected)
RESUME_CHANGES = [
    ({"total_steps": 20, "lr.base": 0.3}, ["lr.base: 0.2 -> 0.3", "total_steps: 10 -> 20"], 20, 0),
    ({"total_steps": 20}, ["total_steps: 10 -> 20"], 20, 0),
    ({"global_batch_size": 64}, ["global_batch_size: 128 -> 64"], 10, 1),
    ({"global_batch_size": 256}, ["global_batch_size: 128 -> 256"], 15, 0),
    ({}, [], 10, 1),
]


@pytest.mark.parametrize(("fields", "changes", "final_step", "nothing_to_do"), RESUME_CHANGES)
def test_resume_with_changed_config(
    tmp_path, data_dir, caplog, fields, changes, final_step, nothing_to_do
):
    caplog.set_level(logging.INFO)
    train.train_and_evaluate(_config(data_dir, total_steps=10), str(tmp_path))
    caplog.clear()
    train.train_and_evaluate(_config(data_dir, **{"total_steps": 10, **fields}), str(tmp_path))
    logged_changes = [c for _, c in testutil.logged(tmp_path, "config_change")]
    assert logged_changes == changes
    for change in changes:
        assert f"config changed on resume: {change}" in caplog.text
    assert caplog.text.count("nothing to do:") == nothing_to_do
    assert testutil.logged(tmp_path, "loss")[-1][0] == final_step
    # The progress line counts plan steps: never past the total, never a negative ETA.
    progress = [line for line in caplog.text.splitlines() if "train | step: " in line]
    assert len(progress) >= (0 if nothing_to_do else 1)
    for line in progress:
        done, total = line.split("| step: ")[1].split(" ")[0].split("/")
        assert int(done) <= int(total), line
        assert "eta: -" not in line


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [({"seed": 1}, "seed: 0 -> 1"), ({"dataset.train_split": "train[:50%]"}, "train_split")],
)
def test_resume_that_breaks_the_data_order_is_refused_unless_allowed(
    tmp_path, data_dir, fields, fragment
):
    train.train_and_evaluate(_config(data_dir, total_steps=10), str(tmp_path))
    with pytest.raises(ConfigError, match="allow_data_change_on_resume") as error:
        train.train_and_evaluate(_config(data_dir, total_steps=20, **fields), str(tmp_path))
    assert fragment in str(error.value) and "exact data order" in str(error.value)
    allowed = _config(data_dir, total_steps=20, allow_data_change_on_resume=True, **fields)
    train.train_and_evaluate(allowed, str(tmp_path))
    assert testutil.logged(tmp_path, "loss")[-1][0] == 20


@pytest.mark.parametrize(
    ("field", "old", "new", "cli_old"),
    [
        ("precision", "float32", "mixed_float16", "float32"),  # Adds the loss scale.
        ("optimizer.momentum_correction", False, True, "False"),  # A previous LR per weight.
        ("ema_decay", 0.0, 0.9, "0.0"),  # The averaged weights.
    ],
)
def test_resume_with_a_field_that_adds_checkpointed_state_names_it(
    tmp_path, data_dir, field, old, new, cli_old
):
    """Not TF's list of unmatched variables: one line with the field, both values, the ways out;
    and the way out it suggests (fine-tune in a new workdir from that checkpoint) works."""
    workdir = tmp_path / "run"
    train.train_and_evaluate(_config(data_dir, total_steps=10, **{field: old}), str(workdir))
    changed = _config(data_dir, total_steps=20, **{field: new})
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(changed, str(workdir))
    prefix = workdir / "checkpoints" / "ckpt-10"
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"{field} changed on resume from {json.dumps(old)} (in {prefix}) to {json.dumps(new)}"
    )
    assert f"resume with --config.{field}={cli_old}, or start a new --workdir" in message
    assert f"--config.init_checkpoint={prefix} to fine-tune" in message
    assert testutil.logged(workdir, "loss")[-1][0] == 10  # Nothing trained, nothing lost.
    fine_tuned = tmp_path / "fine_tuned"
    changed.init_checkpoint = str(prefix)
    train.train_and_evaluate(changed, str(fine_tuned))
    assert testutil.logged(fine_tuned, "loss")[-1][0] == 20


# ---------------------------------------------------------------------------------------------
# 6. Every signal-initiated stop exits 42.

SUBPROCESS_RUN = (
    "--config.total_steps=100000",
    "--config.steps_per_loop=5",
    "--config.log_every_steps=5",
    "--config.model.name=mlp",
    "--config.model.width=8",
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_two_quick_signals_still_exit_42(tmp_path, data_dir, signum):
    process = testutil.start_main(tmp_path, *SUBPROCESS_RUN, data_dir=data_dir)
    testutil.wait_for_step(tmp_path, 10, process)
    process.send_signal(signum)
    time.sleep(0.1)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == preemption.EXIT_CODE_PREEMPTED, stderr[-3000:]
    # The second signal was only logged (or ignored while exiting); the save is complete.
    step = int(stderr.split("preempted: checkpoint at step ")[1].split(";")[0])
    assert step >= 10 and (tmp_path / "checkpoints" / f"ckpt-{step}.manifest.json").exists()


def test_signal_during_set_up_exits_42(tmp_path, data_dir):
    process = testutil.start_main(tmp_path, *SUBPROCESS_RUN, data_dir=data_dir)
    time.sleep(1.0)  # Importing TensorFlow, well before the first step.
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == preemption.EXIT_CODE_PREEMPTED, stderr[-3000:]
    assert "preempted" in stderr


# ---------------------------------------------------------------------------------------------
# 10. A full disk: one line naming the path; the previous checkpoint stays intact.


def _full_disk(*args, **kwargs):
    raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    config = _config(data_dir)
    train.train_and_evaluate(_config(data_dir, total_steps=10), str(tmp_path))
    monkeypatch.setattr(tf.train.Checkpoint, "write", _full_disk)
    with pytest.raises(checkpointing.CheckpointError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message
    assert "ckpt-20" in message and "ckpt-10 is intact" in message and "rerun" in message
    monkeypatch.undo()
    train.train_and_evaluate(config, str(tmp_path))  # Space freed: the rerun resumes.
    assert testutil.logged(tmp_path, "loss")[-1][0] == 20


def test_full_disk_while_logging_is_one_line(tmp_path, data_dir, monkeypatch):
    writer = metrics.MetricWriter(str(tmp_path), enabled=True, total_steps=10, resume_step=0)
    monkeypatch.setattr(writer._jsonl, "write", _full_disk)
    with pytest.raises(metrics.MetricsWriteError) as error:
        writer.write(5, {"loss": 1.0})
    message = str(error.value)
    assert "\n" not in message and "metrics.jsonl" in message and "No space left" in message


def test_main_prints_one_line_for_a_user_error(tmp_path, data_dir):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    result = testutil.run_main(tmp_path, *SUBPROCESS_RUN, data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "history of a run" in result.stderr

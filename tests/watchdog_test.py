"""Tests for trainer/watchdog.py: when a watched call counts as hung, and what is dumped."""

import subprocess
import threading

import pytest
import testutil

from configs import default as default_config
from trainer import watchdog
from trainer.errors import ConfigError


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _watchdog(clock, stream, factor=10.0, floor=60.0, repeat=300.0) -> watchdog.Watchdog:
    return watchdog.Watchdog(
        factor=factor, floor_seconds=floor, repeat_seconds=repeat, clock=clock, stream=stream
    )


def _record(dog: watchdog.Watchdog, clock: _Clock, what: str, seconds: list[float]) -> None:
    for duration in seconds:
        with dog.watch(what, 0):
            clock.now += duration


@pytest.mark.parametrize(
    "durations, limit",
    [
        ([], 600.0),  # No history: factor x floor...
        ([30.0], 600.0),  # ...also after the first call, which compiles and is left out.
        ([30.0, 0.5, 0.4, 9.0], 60.0),  # 10 x median 0.5 s = 5 s, below the floor.
        ([0.1, 20.0, 30.0, 25.0], 250.0),  # 10 x median 25 s.
    ],
)
def test_limit_is_factor_times_median_at_least_the_floor(tmp_path, durations, limit):
    clock = _Clock()
    dog = _watchdog(clock, None)
    _record(dog, clock, "train loop", durations)
    assert dog.limit("train loop") == pytest.approx(limit)
    assert dog.limit("checkpoint save") == 600.0  # Each kind of call has its own history.


def test_overdue_call_dumps_every_stack_then_again_every_repeat_seconds(tmp_path, caplog):
    clock = _Clock()
    with open(tmp_path / "stacks", "w+") as stream:
        dog = _watchdog(clock, stream, repeat=100.0)
        _record(dog, clock, "train loop", [9.0, 1.0, 1.0, 1.0])
        with dog.watch("train loop", 40):
            clock.now += 59.0
            assert not dog.check()  # Under the 60 s floor.
            clock.now += 2.0
            assert dog.check()
            assert not dog.check()  # Not again until repeat_seconds have passed...
            clock.now += 100.0
            assert dog.check()  # ...then again.
        assert not dog.check()  # Nothing is running.
        stream.seek(0)
        stacks = stream.read()
    assert stacks.count("Current thread") == 2  # faulthandler's header of the calling thread.
    assert "in test_overdue_call_dumps_every_stack_then_again_every_repeat_seconds" in stacks
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("watchdog:")]
    assert lines[0].startswith("watchdog: the train loop started at step 40 has run 61 s")
    assert "(limit 60 s: 10 x its recent median, at least 60 s)" in lines[0]
    assert "has run 161 s" in lines[1]


def test_the_thread_dumps_the_stack_of_the_stuck_thread(tmp_path):
    """Real clock and thread: the dump shows where the stuck (main) thread waits."""
    released = threading.Event()
    with open(tmp_path / "stacks", "w+") as stream:
        dog = watchdog.Watchdog(factor=1.0, floor_seconds=1.0, repeat_seconds=60.0, stream=stream)
        with dog, dog.watch("checkpoint save", 7):
            released.wait(2.5)
        stream.seek(0)
        stacks = stream.read()
    assert "Thread 0x" in stacks and 'File "' in stacks
    assert "in test_the_thread_dumps_the_stack_of_the_stuck_thread" in stacks


def test_factor_zero_is_off(tmp_path):
    clock = _Clock()
    dog = _watchdog(clock, None, factor=0.0)
    with dog, dog.watch("train loop", 0):
        clock.now += 1e6
        assert not dog.check()


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("factor", -1.0, "watchdog.factor (-1.0) must be >= 0"),
        ("floor_seconds", 0.5, "watchdog.floor_seconds (0.5) must be >= 1"),
        ("repeat_seconds", 0.0, "watchdog.repeat_seconds (0.0) must be >= 1"),
    ],
)
def test_bad_fields_are_one_line_config_errors(field, value, shown):
    config = default_config.get_config().watchdog
    config[field] = value
    with pytest.raises(ConfigError, match=shown.replace("(", r"\(").replace(")", r"\)")):
        watchdog.check_config(config)


@pytest.mark.slow
def test_a_stalled_train_loop_dumps_the_stacks_to_the_log(tmp_path, data_dir):
    """tests/stall_injection.py stalls the 3rd train-loop call for 4 s; the run still finishes."""
    command = testutil.main_command(
        tmp_path,
        "--config.model.name=mlp",
        "--config.model.width=8",
        "--config.total_steps=25",
        "--config.lr.warmup_steps=5",
        "--config.steps_per_loop=5",
        "--config.log_every_steps=5",
        "--config.eval_every_steps=25",
        "--config.checkpoint_every_steps=25",
        "--config.watchdog.floor_seconds=1",
        "--config.watchdog.repeat_seconds=1",
        "--stall_at_call=3",
        "--stall_seconds=4",
        data_dir=data_dir,
        module="stall_injection",
    )
    result = subprocess.run(
        command,
        cwd=testutil.REPO,
        env=testutil.INJECTION_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stderr = result.stderr
    assert "watchdog: the train loop started at step 10 has run" in stderr
    # faulthandler's dump, with the frame the main thread is stuck in; repeated while stuck.
    assert stderr.count("in stalled_train_loop") >= 2, stderr[-3000:]
    assert "Thread 0x" in stderr

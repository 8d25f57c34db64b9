"""Tests for trainer/workdir_lock.py: one trainer per workdir, stale locks and racing starters."""

import collections
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from trainer import workdir_lock
from trainer.workdir_lock import LockError, WorkdirLock


def _lock_path(workdir) -> str:
    return os.path.join(str(workdir), workdir_lock.LOCK_FILE)


def _read(workdir) -> dict:
    with open(_lock_path(workdir)) as f:
        return json.load(f)


def _write(workdir, content: str) -> None:
    with open(_lock_path(workdir), "w") as f:
        f.write(content)


def _dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert process.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)
    return process.pid


def test_acquire_writes_owner_and_release_removes_it(tmp_path):
    lock = WorkdirLock(str(tmp_path))
    assert not os.path.exists(_lock_path(tmp_path))
    lock.acquire()
    owner = _read(tmp_path)
    assert owner["host"] == socket.gethostname()
    assert owner["pid"] == os.getpid()
    assert isinstance(owner["since"], float)
    lock.release()
    assert not os.path.exists(_lock_path(tmp_path))
    lock.release()  # Releasing twice is harmless and removes nothing else.
    assert os.listdir(tmp_path) == []


def test_second_lock_on_same_workdir_is_refused_naming_file_and_fix(tmp_path):
    with WorkdirLock(str(tmp_path)):
        second = WorkdirLock(str(tmp_path))
        with pytest.raises(LockError) as error:
            second.acquire()
        message = str(error.value)
        assert _lock_path(tmp_path) in message
        assert f"pid {os.getpid()}" in message
        assert "delete that file" in message
        second.release()  # It never held the lock: the owner's file stays.
        assert _read(tmp_path)["pid"] == os.getpid()
    assert not os.path.exists(_lock_path(tmp_path))


def test_context_manager_releases_after_an_exception(tmp_path):
    with pytest.raises(KeyError), WorkdirLock(str(tmp_path)) as lock:
        assert isinstance(lock, WorkdirLock)
        assert os.path.exists(_lock_path(tmp_path))
        raise KeyError("boom")
    assert not os.path.exists(_lock_path(tmp_path))
    with WorkdirLock(str(tmp_path)):  # The workdir can be locked again.
        assert _read(tmp_path)["pid"] == os.getpid()


def test_stale_lock_of_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write(tmp_path, json.dumps({"host": socket.gethostname(), "pid": dead, "since": 0.0}))
    with WorkdirLock(str(tmp_path)):
        owner = _read(tmp_path)
        assert owner["pid"] == os.getpid()
        assert owner["host"] == socket.gethostname()
    assert not os.path.exists(_lock_path(tmp_path))


@pytest.mark.parametrize(
    "holder",
    [
        # Another host: its pid cannot be checked from here, even if it is dead on this host.
        lambda: ({"host": "elsewhere", "pid": _dead_pid(), "since": 0.0}, "host elsewhere"),
        lambda: ({"host": "elsewhere", "pid": os.getpid(), "since": 0.0}, "host elsewhere"),
        # A live process on this host (the parent of this test process).
        lambda: ({"host": socket.gethostname(), "pid": os.getppid()}, f"pid {os.getppid()})"),
        # Unreadable or incomplete: the owner is unknown, so nothing is deleted.
        lambda: ("not json {", "host ?, pid ?"),
        lambda: ({"host": socket.gethostname()}, "pid ?"),
        lambda: ({"host": socket.gethostname(), "pid": "123"}, "pid 123"),
    ],
    ids=["other-host-dead-pid", "other-host", "live-pid", "corrupt", "no-pid", "pid-not-int"],
)
def test_lock_that_cannot_be_proven_stale_is_kept(tmp_path, holder):
    content, shown = holder()
    content = content if isinstance(content, str) else json.dumps(content)
    _write(tmp_path, content)
    with pytest.raises(LockError) as error:
        WorkdirLock(str(tmp_path)).acquire()
    assert _lock_path(tmp_path) in str(error.value)
    assert shown in str(error.value)
    with open(_lock_path(tmp_path)) as f:
        assert f.read() == content  # Untouched.


@contextlib.contextmanager
def _unwritable_directory(path):
    """Makes `path` refuse new files: chmod for a normal user; for root (whom chmod does not stop)
    the immutable attribute, where the filesystem and capabilities allow it."""
    os.makedirs(path)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", path], capture_output=True).returncode:
        pytest.skip("running as root without `chattr +i`: cannot make a directory unwritable")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", path], check=True)


def test_unwritable_workdir_is_a_permission_error_naming_it(tmp_path):
    workdir = str(tmp_path / "readonly")
    with _unwritable_directory(workdir):
        with pytest.raises(PermissionError) as error:
            WorkdirLock(workdir).acquire()
        assert not os.path.exists(_lock_path(workdir))
    assert f"workdir {workdir} is not writable" in str(error.value)
    assert "--workdir" in str(error.value)


def test_workdir_that_cannot_exist_is_an_os_error_naming_it_and_the_fix(tmp_path):
    (tmp_path / "file").write_text("a regular file, not a directory")
    workdir = str(tmp_path / "file" / "workdir")
    with pytest.raises(OSError) as error:
        workdir_lock.make_workdir(workdir)
    message = str(error.value)
    assert message.startswith(f"workdir {workdir} cannot be created (")
    assert message.endswith("use a --workdir you can write to")


def test_remote_workdir_is_not_locked_but_says_so(caplog):
    lock = workdir_lock.WorkdirLock("gs://bucket/run")
    lock.acquire()
    lock.release()
    assert "no workdir lock on gs://bucket/run" in caplog.text


# Starters race in processes forked from one driver that imports only trainer.workdir_lock (not
# TensorFlow, ~4 s per import), so many processes and trials fit in a few seconds.
_RACE = r"""
import json, multiprocessing, os, sys
from trainer.workdir_lock import LockError, WorkdirLock

def starter(workdirs, barrier, results):
    for trial, workdir in enumerate(workdirs):
        lock = WorkdirLock(workdir)
        barrier.wait(timeout=60)  # Every starter goes at once.
        try:
            lock.acquire()
            outcome = "won"
        except Exception as error:
            outcome = f"{type(error).__name__}: {error}"
        barrier.wait(timeout=60)  # The winner holds the lock until every starter has tried.
        try:
            lock.release()
        except Exception as error:
            outcome += f", release {type(error).__name__}"
        results.put((trial, os.getpid(), outcome))

starters, workdirs = int(sys.argv[1]), sys.argv[2:]
context = multiprocessing.get_context("fork")
barrier, results = context.Barrier(starters), context.Queue()
processes = [
    context.Process(target=starter, args=(workdirs, barrier, results)) for _ in range(starters)
]
for process in processes:
    process.start()
outcomes = [results.get(timeout=120) for _ in range(starters * len(workdirs))]
for process in processes:
    process.join()
print(json.dumps(outcomes))
"""


def test_concurrent_starters_on_a_stale_lock_have_exactly_one_winner(tmp_path):
    starters, trials = 16, 30
    stale = json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": 0.0})
    workdirs = [str(tmp_path / f"trial{trial}") for trial in range(trials)]
    for workdir in workdirs:
        os.makedirs(workdir)
        _write(workdir, stale)
    run = subprocess.run(
        [sys.executable, "-c", _RACE, str(starters), *workdirs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    winners = {trial: pid for trial, pid, outcome in results if outcome == "won"}
    kinds = [collections.Counter() for _ in range(trials)]
    for trial, _, outcome in results:
        # A loser names the winner, not the dead pid of the stale lock it replaced.
        lost = f"LockError: another trainer holds {workdirs[trial]}/{workdir_lock.LOCK_FILE} (host "
        lost += f"{socket.gethostname()}, pid {winners.get(trial)})"
        kinds[trial]["lost" if outcome.startswith(lost) else outcome.split(":")[0]] += 1
    bad = {
        trial: dict(kind)
        for trial, kind in enumerate(kinds)
        if kind != {"won": 1, "lost": starters - 1}
    }
    assert not bad, f"{len(bad)} of {trials} trials without exactly one winner: {bad}"
    for workdir in workdirs:  # The winner released its lock; nothing else is left behind.
        assert os.listdir(workdir) == []


_HOLDER = """
import sys, time
from trainer.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(300)
"""


@contextlib.contextmanager
def _holder_process(workdir):
    """A trainer-like process of this host holding the lock of `workdir` until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_lock_of_a_live_trainer_in_another_process_is_refused(tmp_path):
    with _holder_process(tmp_path) as holder:
        with pytest.raises(LockError) as error:
            WorkdirLock(str(tmp_path)).acquire()
        assert (
            f"another trainer holds {_lock_path(tmp_path)} (host {socket.gethostname()}, pid "
            f"{holder.pid})"
        ) in str(error.value)
        assert _read(tmp_path)["pid"] == holder.pid
        assert os.listdir(tmp_path) == [workdir_lock.LOCK_FILE]  # No private file left behind.


def test_lock_of_a_killed_trainer_is_taken_over_by_the_next_start(tmp_path):
    with _holder_process(tmp_path) as holder:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert (
        _read(tmp_path)["pid"] == holder.pid
    )  # kill -9 left the file; the kernel freed the flock.
    with WorkdirLock(str(tmp_path)):
        assert _read(tmp_path)["pid"] == os.getpid()
    assert os.listdir(tmp_path) == []


def test_flocked_lock_naming_a_dead_pid_is_refused(tmp_path, monkeypatch):
    # E.g. a child forked by a dead trainer still holds the flock: the kernel decides, not the pid.
    monkeypatch.setattr(workdir_lock, "_TAKEOVER_WAIT_SECONDS", 0.05)
    content = json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "since": 0.0})
    _write(tmp_path, content)
    with open(_lock_path(tmp_path)) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockError) as error:
            WorkdirLock(str(tmp_path)).acquire()
    assert f"another trainer holds {_lock_path(tmp_path)}" in str(error.value)
    assert os.listdir(tmp_path) == [workdir_lock.LOCK_FILE]
    with open(_lock_path(tmp_path)) as f:
        assert f.read() == content  # Untouched.


def test_starter_that_flocks_a_stale_lock_replaced_since_it_opened_it_looks_again(tmp_path):
    # Step 2's race: B opens the stale file; A renames its lock over it and lets go; B now gets
    # the old file's flock. The window is too narrow to hit from outside (0 times in 18,000
    # racing starts), so B's step is called directly: it must not put its file over A's lock.
    _write(tmp_path, json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    b_private = tmp_path / "b.new"
    b_private.write_text("b")
    stale = os.open(_lock_path(tmp_path), os.O_RDONLY)
    try:
        with WorkdirLock(str(tmp_path)):  # A takes the stale lock over.
            a_lock = os.stat(_lock_path(tmp_path))
            b = WorkdirLock(str(tmp_path))
            assert not b._take_over_if_stale(stale, str(b_private), deadline=0.0)
            assert os.path.samestat(os.stat(_lock_path(tmp_path)), a_lock)
            assert b_private.read_text() == "b"
    finally:
        os.close(stale)


def test_release_leaves_a_lock_replaced_while_held(tmp_path):
    first = WorkdirLock(str(tmp_path))
    first.acquire()
    os.remove(_lock_path(tmp_path))  # Deleted by hand while held...
    with WorkdirLock(str(tmp_path)):  # ...so another trainer could start.
        second = os.stat(_lock_path(tmp_path))
        first.release()
        assert os.path.samestat(os.stat(_lock_path(tmp_path)), second)
    assert os.listdir(tmp_path) == []

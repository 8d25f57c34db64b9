"""Tests for trainer/workdir_lock.py: one trainer per workdir, stale locks, unwritable workdirs."""

import contextlib
import json
import os
import shutil
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

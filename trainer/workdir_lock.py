"""One trainer per workdir: a lock file naming its owner, flocked by it for the whole run."""

import contextlib
import fcntl
import json
import os
import secrets
import socket
import time

from absl import logging

from trainer.errors import UserError

LOCK_FILE = "trainer.lock"
# A starter replacing a stale lock holds the stale file's flock for the microseconds between
# checking and renaming; another starter that sees this waits up to this long for the new owner.
_TAKEOVER_WAIT_SECONDS = 1.0


class WorkdirError(UserError, PermissionError):
    """The workdir cannot be created or written; the message says to pick another."""


class LockError(UserError):
    """Another trainer owns the workdir; the message names it and how to break a stale lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_workdir(workdir: str) -> None:
    """Creates `workdir`, turning TF's file errors into one actionable OSError."""
    # Imported here, not at the top: the lock itself needs no TensorFlow (a ~4 s import).
    import tensorflow as tf

    try:
        tf.io.gfile.makedirs(workdir)
    except tf.errors.OpError as error:
        raise WorkdirError(
            f"workdir {workdir} cannot be created ({error.message}); use a --workdir you can "
            "write to"
        ) from error


def _read_owner(fd: int) -> dict:
    """The JSON owner record of the open lock file; {} if unreadable."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _is_named(path: str, fd: int) -> bool:
    """True if `path` still names the file open as `fd` (not removed or replaced since)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


class WorkdirLock:
    """Held by the chief for the whole run; released on exit, also after an exception.

    The kernel is the liveness truth: the owner holds an exclusive `flock` on the lock file until
    it releases it or dies (even by kill -9). The name `trainer.lock` only changes under the flock
    of the file it names, and each change is one atomic call, so starters racing on a stale lock
    have exactly one winner:
    1. A new lock is written to a private file and flocked, then hard-linked to `trainer.lock`
       (create-if-absent): the lock is never seen empty or unlocked.
    2. A lock whose flock we get, still named `trainer.lock`, naming a dead process of this host,
       is stale: our private file is renamed over it. A racing starter either fails the flock, or
       gets it once we let go and finds the name now points to another file, and looks again.
    3. Nothing else is taken over: a held flock; a lock from another host (its pid cannot be
       checked, and flock may not reach across hosts on a network filesystem); a live pid (e.g. a
       trainer of a version without flock); unreadable JSON. The error says how to break it.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None  # Our lock file, open and flocked while we hold it.

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
          LockError: another trainer holds it, or a lock that cannot be proven stale is there.
          PermissionError: the workdir is not writable.
        """
        if "://" in self.path:  # gs:// etc. have neither flock nor atomic create-if-absent.
            logging.warning("no workdir lock on %s: only local filesystems are locked", self.path)
            return
        fd, private = self._write_private_lock()
        try:
            self._install(private)
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):  # Already gone if renamed into place.
                os.remove(private)
        self._fd = fd

    def _write_private_lock(self) -> tuple[int, str]:
        """A flocked file under a name only we know, holding our owner record."""
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        private = f"{self.path}.{os.getpid()}.{secrets.token_hex(4)}.new"
        try:
            fd = os.open(private, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except PermissionError as error:
            raise WorkdirError(
                f"workdir {os.path.dirname(self.path)} is not writable ({error.strerror}); "
                "use a --workdir you can write to"
            ) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # Nobody else knows this file: does not block.
            os.write(fd, json.dumps(owner).encode())
        except BaseException:
            os.close(fd)
            os.remove(private)
            raise
        return fd, private

    def _install(self, private: str) -> None:
        """Makes `private` the lock: as a new one, or over a stale one. Raises LockError."""
        deadline = time.monotonic() + _TAKEOVER_WAIT_SECONDS
        while True:
            try:
                os.link(private, self.path)
                return
            except FileExistsError:
                pass
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # Released just now: try to create it again.
            try:
                if self._take_over_if_stale(fd, private, deadline):
                    return
            finally:
                os.close(fd)  # Lets go of the old file's flock, if we got it.

    def _take_over_if_stale(self, fd: int, private: str, deadline: float) -> bool:
        """Renames `private` over the lock open as `fd` if it is stale; False to look again."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_owner(fd)
            if self._names_dead_process(holder) and time.monotonic() < deadline:
                time.sleep(0.01)  # Another starter is replacing this stale lock right now.
                return False
            raise self._held_error(holder) from None
        if not _is_named(self.path, fd):
            return False  # Released or replaced between our open and our flock.
        holder = _read_owner(fd)
        if not self._names_dead_process(holder):
            raise self._held_error(holder)
        logging.warning("taking over stale lock %s of dead process %s", self.path, holder["pid"])
        os.rename(private, self.path)
        return True

    @staticmethod
    def _names_dead_process(holder: dict) -> bool:
        pid = holder.get("pid")
        same_host = holder.get("host") == socket.gethostname()
        return same_host and isinstance(pid, int) and pid > 0 and not _alive(pid)

    def _held_error(self, holder: dict) -> LockError:
        return LockError(
            f"another trainer holds {self.path} (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}); stop it first, or delete that file if it is no longer "
            "running"
        )

    def release(self) -> None:
        """Deletes the lock file if we hold it and it is still ours, then drops the flock."""
        if self._fd is None:
            return
        try:
            if _is_named(self.path, self._fd):
                os.remove(self.path)  # Under our flock: no starter is replacing it.
            else:
                logging.warning("%s was deleted or replaced while held; left as is", self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""One trainer per workdir: a lock file naming its owner, with stale locks detected."""

import json
import os
import socket
import time

import tensorflow as tf
from absl import logging

LOCK_FILE = "trainer.lock"


class LockError(RuntimeError):
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
    try:
        tf.io.gfile.makedirs(workdir)
    except tf.errors.OpError as error:
        raise OSError(
            f"workdir {workdir} cannot be created ({error.message}); use a --workdir you can "
            "write to"
        ) from error


class WorkdirLock:
    """Held by the chief for the whole run; released on exit, also after an exception.

    Created with O_EXCL, so two trainers starting together cannot both win. A lock left by a
    process on this host that no longer exists is stale and is taken over with a warning; a lock
    from another host cannot be checked, so the error says how to break it by hand.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._held = False

    def acquire(self) -> None:
        if "://" in self.path:  # gs:// etc. have no atomic create-if-absent through os.open.
            logging.warning("no workdir lock on %s: only local filesystems are locked", self.path)
            return
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            except PermissionError as error:
                raise PermissionError(
                    f"workdir {os.path.dirname(self.path)} is not writable ({error.strerror}); "
                    "use a --workdir you can write to"
                ) from error
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self._held = True
            return
        raise LockError(f"could not take {self.path}; another trainer is starting right now")

    def _handle_existing(self) -> None:
        try:
            with open(self.path) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            holder = {}
        same_host = holder.get("host") == socket.gethostname()
        if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            logging.warning("removing stale lock %s of dead process %s", self.path, holder["pid"])
            os.remove(self.path)
            return
        raise LockError(
            f"another trainer holds {self.path} (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}); stop it first, or delete that file if it is no longer "
            "running"
        )

    def release(self) -> None:
        if self._held:
            os.remove(self.path)
            self._held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

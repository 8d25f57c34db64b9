"""A daemon thread that dumps every thread's stack when an inner loop or a save hangs.

Multi-worker jobs that hang say nothing (tensorflow/tensorflow#35878): a worker stuck in Python
(a lock, a filesystem call) keeps sending heartbeats, so TF never fails the job. The outer loop
wraps the calls that can hang (the train and eval loops, checkpoint saves) in `watch(what,
step)` (through `WatchdogAction.around`). When one has run longer than max(`factor` x the
median of its recent durations, `floor_seconds`) (the first call of each kind compiles, so it
is left out of the median), the thread logs what is stuck, since when and at which step, then
the stacks of all threads (`faulthandler`, which takes no lock the stuck thread may hold), and
again every `repeat_seconds` while it stays stuck. It never stops the run: the collective and
heartbeat timeouts (distribute.py) do that.

Cost per watched call: two clock reads and a list append, on boundaries where the host already
waits for the device; nothing is added inside the compiled loops and no host sync. The thread
wakes once per `_POLL_SECONDS`.
"""

import collections
import contextlib
import dataclasses
import faulthandler
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator

import ml_collections
from absl import logging

from trainer.actions import Action, Phase
from trainer.errors import ConfigError

_POLL_SECONDS = 1.0  # How often the thread looks; also the smallest floor_seconds allowed.
_HISTORY = 20  # Recent durations per kind of call the median is taken over.


@dataclasses.dataclass
class _Call:
    what: str  # E.g. "train loop", "checkpoint save".
    step: int  # The step the call started at.
    started: float
    limit: float
    next_dump: float  # When the (next) stack dump is due.


def check_config(config: ml_collections.ConfigDict) -> None:
    """`config.watchdog`'s fields, checked at start-up."""
    if config.factor < 0:
        raise ConfigError(f"watchdog.factor ({config.factor}) must be >= 0; 0 = no watchdog")
    if config.floor_seconds < _POLL_SECONDS:
        raise ConfigError(
            f"watchdog.floor_seconds ({config.floor_seconds}) must be >= {_POLL_SECONDS:g}, "
            "how often the watchdog looks"
        )
    if config.repeat_seconds < _POLL_SECONDS:
        raise ConfigError(
            f"watchdog.repeat_seconds ({config.repeat_seconds}) must be >= {_POLL_SECONDS:g}"
        )


class Watchdog:
    """Times the watched calls and reports the ones that hang (see the module docstring)."""

    def __init__(
        self,
        *,
        factor: float,
        floor_seconds: float,
        repeat_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        stream=None,
    ):
        """`stream`: where the stacks go (a file with a descriptor; sys.stderr when None)."""
        self._factor, self._floor, self._repeat = factor, floor_seconds, repeat_seconds
        self._clock = clock
        self._stream = stream
        self._durations: dict[str, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=_HISTORY)
        )
        self._seen: set[str] = set()  # Kinds of call made at least once.
        self._call: _Call | None = None  # Replaced whole: the thread reads it without a lock.
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "Watchdog":
        return cls(
            factor=config.factor,
            floor_seconds=config.floor_seconds,
            repeat_seconds=config.repeat_seconds,
        )

    def limit(self, what: str) -> float:
        """How long a call of this kind may run: `factor` x its recent median, at least the
        floor; `factor` x the floor while there is no history yet."""
        durations = self._durations[what]
        if not durations:
            return self._factor * self._floor
        return max(self._factor * statistics.median(durations), self._floor)

    @contextlib.contextmanager
    def watch(self, what: str, step: int) -> Iterator[None]:
        """Times the block as a call of kind `what` that started at `step`."""
        if not self._factor:
            yield
            return
        started = self._clock()
        limit = self.limit(what)
        self._call = _Call(what, step, started, limit, next_dump=started + limit)
        try:
            yield
        finally:
            self._call = None
            if what in self._seen:  # The first call traces and compiles: not a typical one.
                self._durations[what].append(self._clock() - started)
            self._seen.add(what)

    def check(self) -> bool:
        """Dumps the stacks if the current call is overdue; True if it did. Run by the thread
        every second; callable directly (tests)."""
        call, now = self._call, self._clock()
        if call is None or now < call.next_dump:
            return False
        call.next_dump = now + self._repeat
        stream = self._stream or sys.stderr
        logging.error(
            "watchdog: the %s started at step %d has run %.0f s (limit %.0f s: %g x its recent "
            "median, at least %g s); stacks of all threads follow, again every %g s while stuck",
            call.what,
            call.step,
            now - call.started,
            call.limit,
            self._factor,
            self._floor,
            self._repeat,
        )
        stream.flush()
        faulthandler.dump_traceback(file=stream, all_threads=True)
        return True

    def _run(self) -> None:
        while not self._stopped.wait(_POLL_SECONDS):
            self.check()

    def __enter__(self) -> "Watchdog":
        if self._factor:
            self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()


class WatchdogAction(Action):
    """The watchdog as an action: it times every phase the outer loop wraps (train loop, eval
    loop, checkpoint save); its thread runs from construction to `close`."""

    def __init__(self, watchdog: Watchdog):
        self.watchdog = watchdog.__enter__()

    @classmethod
    def from_run(cls, run) -> "WatchdogAction":
        return cls(Watchdog.from_config(run.config.watchdog))

    def around(self, phase: Phase) -> contextlib.AbstractContextManager:
        return self.watchdog.watch(phase.what, phase.step)

    def close(self) -> None:
        self.watchdog.__exit__(None, None, None)

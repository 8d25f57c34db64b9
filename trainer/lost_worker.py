"""A worker lost mid-run (killed, frozen, unreachable, stuck in a collective) as one line, exit 43.

What TF raises on the surviving workers, measured on loopback with TF 2.21: a killed peer resets
its connections (`UnavailableError ... Connection reset by peer ... from remote target
/job:worker/replica:0/task:1`, 2.5-4.5 s after the kill); a frozen one stops sending heartbeats
and the coordination service fails every collective (`UnavailableError ... The following tasks
are unhealthy (stopped sending heartbeats): /job:worker/replica:0/task:1`, after
`distribution.heartbeat_timeout_seconds`); a collective that waits longer than
`distribution.collective_timeout_seconds` raises `DeadlineExceededError`; a collective a failing
peer aborted raises `AbortedError`.

Why not exit 42 ("preempted, rerun me") so the launchers restart: 42 promises that every worker
stopped at the same checkpoint and that rerunning each worker's command resumes the job. Here one
worker is gone: a survivor rerun alone would wait at start-up for a peer whose launcher has ended
(a killed trainer exits 137, which no launcher restarts). All workers must be relaunched
together (by hand or by the scheduler: Slurm's --requeue); they resume from the newest complete
checkpoint. Exit 43 says exactly that to the launchers and to whoever reads the job's status.
"""

import re

import tensorflow as tf

EXIT_CODE_LOST_WORKER = 43
# The errors above. Caught on multi-worker runs only: on one worker they mean something else (a
# storage service unavailable, ...) and keep their traceback.
LOST_CONTACT_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
)
# A task as TF names it in these messages: /job:worker/replica:0/task:1 or /job:worker/task:1.
_TASK = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")
# The phrases that say what happened, in the order they are looked for.
_CAUSES = (
    "stopped sending heartbeats",
    "Connection reset by peer",
    "Connection refused",
    "Socket closed",
    "timed out",
    "Deadline Exceeded",
)
_SHOWN_CHARS = 160  # Of the first line of an error without a known cause.


class LostWorker(Exception):
    """Another worker is gone or stuck; the message names it and says how to resume."""

    def __init__(self, message: str):
        super().__init__(message)


def other_tasks(message: str, own_task: tuple[str, int]) -> list[tuple[str, int]]:
    """The tasks `message` names, other than this process's own, in order of first mention."""
    found = [(job, int(index)) for job, index in _TASK.findall(message)]
    return [task for i, task in enumerate(found) if task != own_task and task not in found[:i]]


def cause(message: str) -> str:
    """A few words for what happened: a known phrase, else the message's first line, cut."""
    for phrase in _CAUSES:
        if phrase.lower() in message.lower():
            return phrase
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    return first[:_SHOWN_CHARS]


def from_error(
    error: tf.errors.OpError,
    *,
    own_task: tuple[str, int],
    step: int,
    last_checkpoint: int | None,
    collective_timeout_seconds: float,
) -> LostWorker:
    """The one-line `LostWorker` for a TF error caught by a surviving worker at `step`."""
    tasks = other_tasks(error.message, own_task)
    who = ", ".join(f"{job} {index}" for job, index in tasks) or "another worker"
    what = cause(error.message)
    if isinstance(error, tf.errors.DeadlineExceededError) and collective_timeout_seconds:
        what = (
            f"a collective waited longer than distribution.collective_timeout_seconds="
            f"{collective_timeout_seconds:g}: {what}"
        )
    resume = (
        f"the last complete checkpoint (step {last_checkpoint})"
        if last_checkpoint is not None
        else "its start (no complete checkpoint yet)"
    )
    return LostWorker(
        f"lost contact with {who} ({type(error).__name__}: {what}) after step {step}: relaunch "
        f"all workers with the same command; the run resumes from {resume}; exit "
        f"{EXIT_CODE_LOST_WORKER}"
    )

"""Tests for trainer/lost_worker.py: the line a surviving worker prints (TF errors as seen)."""

import pytest
import tensorflow as tf

from trainer import lost_worker

# What TF 2.21 raised on the survivor, copied from loopback runs (trimmed).
KILLED_PEER = (
    "Graph execution error:\n\nDetected at node while/CollectiveReduceV2 defined at ...\n"
    "Collective ops is aborted by: recvmsg:Connection reset by peer\n"
    "Additional GRPC error information from remote target /job:worker/replica:0/task:1 while "
    "calling /tensorflow.WorkerService/RecvBuf:\n"
    ':UNKNOWN:Error received from peer  {grpc_message:"recvmsg:Connection reset by peer", '
    "grpc_status:14}\nThe error could be from a previous operation. Restart your program."
)
FROZEN_PEER = (
    "{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/"
    "replica:0/task:0/device:CPU:0}} Collective ops is aborted by: Error reported from "
    "/job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats):\n"
    "/job:worker/replica:0/task:1\nThe tasks have crashed. [Op:CollectiveReduceV2] name: "
)


@pytest.mark.parametrize(
    "error_type, message, own, shown",
    [
        (
            tf.errors.UnavailableError,
            KILLED_PEER,
            ("worker", 0),
            "lost contact with worker 1 (UnavailableError: Connection reset by peer) after step 20",
        ),
        (
            tf.errors.UnavailableError,
            KILLED_PEER.replace("task:1", "task:0"),
            ("worker", 1),
            "lost contact with worker 0 (UnavailableError: Connection reset by peer)",
        ),
        (
            tf.errors.UnavailableError,
            FROZEN_PEER,
            ("worker", 0),  # Its own task is named too (the device of the failing op): left out.
            "lost contact with worker 1 (UnavailableError: stopped sending heartbeats)",
        ),
        (
            tf.errors.DeadlineExceededError,
            "Collective has timed out waiting for other workers.",
            ("worker", 0),
            "lost contact with another worker (DeadlineExceededError: a collective waited longer "
            "than distribution.collective_timeout_seconds=30: timed out)",
        ),
    ],
)
def test_the_line_names_the_lost_task_and_how_to_resume(error_type, message, own, shown):
    error = error_type(None, None, message)
    lost = lost_worker.from_error(
        error, own_task=own, step=20, last_checkpoint=15, collective_timeout_seconds=30.0
    )
    text = str(lost)
    assert "\n" not in text
    assert text.startswith(shown), text
    assert text.endswith(
        "relaunch all workers with the same command; the run resumes from the last complete "
        "checkpoint (step 15); exit 43"
    )


def test_no_complete_checkpoint_yet_says_so():
    error = tf.errors.AbortedError(None, None, "something else entirely\nsecond line")
    lost = lost_worker.from_error(
        error, own_task=("worker", 0), step=3, last_checkpoint=None, collective_timeout_seconds=0
    )
    assert "(AbortedError: something else entirely)" in str(lost)
    assert "resumes from its start (no complete checkpoint yet)" in str(lost)

"""Train input on a tf.data service: the same batches, made by dispatcher-fed worker processes.

For hosts whose CPUs cannot feed their accelerators: the train pipeline (example selection,
decode, augmentation, batching) runs on tf.data service workers, and the trainer only receives
finished replica batches. Start the servers with `python -m trainer.data_service` (__main__.py).

What it preserves (measured in tests/data_service_test.py; BUILD_NOTES.md has the reasoning):
- One service worker: the batches are bit for bit the local pipeline's, resume stays exact.
- N workers: the stream is split among them by element (DYNAMIC sharding: each replica batch is
  made by exactly one worker, none twice, while no worker restarts), but they arrive in the
  order the workers finish them, so step k no longer holds exactly batch k: bitwise
  reproducibility and exact resume are given up (a resume may repeat or skip the few batches
  that were in flight at the checkpoint).
"""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING

from trainer.errors import ConfigError, UserError

# TensorFlow (and sources.py, which imports it) load inside the functions: `python -m
# trainer.data_service` imports this package first, and must start TensorFlow quietly itself.
if TYPE_CHECKING:
    import tensorflow as tf

    from trainer import sources

CONNECT_TIMEOUT_SECONDS = 10.0
_ADDRESS = re.compile(r"(?:grpc://)?(?P<host>[^\s:/]+):(?P<port>\d+)")
_START = "start one with `python -m trainer.data_service --port=PORT` (README, Multiple machines)"


def _host_and_port(address: str) -> tuple[str, int]:
    match = _ADDRESS.fullmatch(address)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ConfigError(
            f"dataset.service_address ({address!r}) is not HOST:PORT (or grpc://HOST:PORT) of a "
            "tf.data dispatcher; '' = the local pipeline"
        )
    return match["host"], int(match["port"])


def check(address: str, split: sources.Split) -> None:
    """Fails now, in one line, where the service could not make this run's batches.

    A dispatcher must accept a TCP connection within CONNECT_TIMEOUT_SECONDS: the tf.data client
    itself keeps retrying an unreachable dispatcher (still waiting after 120 s, measured), inside
    the first train loop. Not checked: that the dispatcher has workers (without any, the first
    train loop waits for one; still waiting after 60 s, measured).

    Raises:
      ConfigError: a malformed address, or a split read through a `py_function`.
      UserError: nothing answers at the address.
    """
    from trainer import sources

    host, port = _host_and_port(address)
    if isinstance(split, sources.RecordSplit):
        raise ConfigError(
            f"dataset.service_address ({address}) cannot serve this dataset: it is read by index "
            "from ArrayRecord through a py_function, which tf.data service workers cannot run; "
            "use the local pipeline (dataset.service_address='')"
        )
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise UserError(
            f"dataset.service_address ({address}): no tf.data dispatcher answers there "
            f"({error.strerror or type(error).__name__}); {_START}"
        ) from None


def distribute(dataset: tf.data.Dataset, address: str) -> tf.data.Dataset:
    """`dataset`, produced by the service's workers; the ops before this point run there.

    DYNAMIC sharding hands the elements of the dataset's source (a `Dataset.range`) to the workers
    one by one, so each element is made once. No `job_name`: every iterator gets its own job,
    which starts at the position its dataset was built for. A named job would be shared with an
    earlier iterator of the same name, and a resumed run would continue that job's stream instead
    of starting at its checkpoint (measured: TF reattaches even when the dataset differs).
    """
    import tensorflow as tf

    return dataset.apply(
        tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
            service=address,  # HOST:PORT means grpc://HOST:PORT to TF.
        )
    )

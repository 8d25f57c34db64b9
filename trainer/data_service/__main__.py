"""Runs a tf.data service dispatcher, or a worker, until killed.

  python -m trainer.data_service --port=5050                                     # the dispatcher
  python -m trainer.data_service --port=5051 --dispatcher=HOST:5050 --host=NAME  # each worker

Then train with `--config.dataset.service_address=HOST:5050`. Workers need no dataset files: the
trainer sends its pipeline as a graph, the in-memory split inside it. `--host` (default: this
machine's hostname) is the name the trainers reach a worker by. One worker keeps the batches
bitwise the local pipeline's; more keep each batch once but not their order (__init__.py).
"""

import socket
import sys

from absl import flags, logging

from trainer import cli

_PORT = flags.DEFINE_integer("port", None, "Port to serve on.", lower_bound=1, upper_bound=65535)
_DISPATCHER = flags.DEFINE_string(
    "dispatcher", None, "HOST:PORT of the dispatcher: run a worker for it; unset = the dispatcher."
)
_HOST = flags.DEFINE_string(
    "host", socket.gethostname(), "Workers only: the name trainers reach this worker by."
)


def main(argv: list[str]) -> None:
    del argv
    cli.start_tensorflow(sys.argv)
    import tensorflow as tf

    service = tf.data.experimental.service
    if _DISPATCHER.value is None:
        server = service.DispatchServer(service.DispatcherConfig(port=_PORT.value))
        logging.info("tf.data dispatcher serving on port %d", _PORT.value)
    else:
        server = service.WorkerServer(
            service.WorkerConfig(
                dispatcher_address=_DISPATCHER.value,
                worker_address=f"{_HOST.value}:%port%",
                port=_PORT.value,
            )
        )
        logging.info(
            "tf.data worker %s:%d serving dispatcher %s",
            _HOST.value,
            _PORT.value,
            _DISPATCHER.value,
        )
    server.join()


if __name__ == "__main__":
    cli.run(main, "port")

"""Standalone evaluator: evaluates a run's checkpoints, also while it trains, from another machine.

  python -m trainer.evaluate --workdir=DIR                        # the newest complete checkpoint
  python -m trainer.evaluate --workdir=DIR --watch [--timeout=S]  # each new one, as it appears

The run's config comes from the checkpoint's manifest; set-up, state, eval loop and restore are
the trainer's own (`setup.prepare`, `state.build_state`, `loop.make_eval_loop`, `loop.evaluate`,
`Checkpointer.restore`), so the numbers are the trainer's eval numbers (with the `ema_` ones of
a run that keeps an EMA of the weights). Read-only towards the run:
it takes no lock and never writes a checkpoint. It writes WORKDIR/eval.jsonl (one record per
evaluated checkpoint) and TensorBoard events in WORKDIR/tensorboard/eval_standalone.

--watch (Orbit's evaluate_continuously): evaluates the newest complete checkpoint it has not
evaluated yet (when it falls behind it skips to the newest, it does not queue), and stops once a
checkpoint completes the run's plan, or after --timeout seconds without a new one. Restarted, it
continues after the last step in eval.jsonl.
"""

import json
import os
import sys
import time

from trainer import cli

if __name__ == "__main__":
    cli.start_tensorflow(sys.argv)  # TensorFlow's start-up chatter hidden (cli.py).

import ml_collections  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags, logging  # noqa: E402

from trainer import checkpointing, loop  # noqa: E402
from trainer import setup as setup_lib  # noqa: E402
from trainer import state as state_lib  # noqa: E402

_WATCH = flags.DEFINE_bool("watch", False, "Evaluate each new checkpoint until the run ends.")
_TIMEOUT = flags.DEFINE_float(
    "timeout", 0, "--watch: stop after this many seconds without a new checkpoint; 0 = never."
)
_POLL_SECONDS = flags.DEFINE_float("poll_seconds", 10, "--watch: how often to look.")
_STRATEGY = flags.DEFINE_string(
    "strategy",
    None,
    "distribution.strategy for the evaluator; default: the run's (multi_worker -> auto: the "
    "evaluator is one process).",
)
_EVAL_DATA_DIR = flags.DEFINE_string(
    "eval_data_dir", None, "dataset.data_dir on this machine; default: the run's."
)

RESULTS_FILE = "eval.jsonl"
TENSORBOARD_RUN = os.path.join("tensorboard", "eval_standalone")


class Evaluator:
    """Evaluates checkpoints of one run; built from the first checkpoint's manifest."""

    def __init__(self, workdir: str, *, strategy: str | None = None, data_dir: str | None = None):
        self.workdir = workdir
        self.directory = os.path.join(workdir, "checkpoints")
        self._strategy, self._data_dir = strategy, data_dir
        self._built = False
        self._summary = None

    def _build(self, manifest: checkpointing.Manifest) -> None:
        """The trainer's set-up, state and eval loop for the run's config (once)."""
        config = ml_collections.ConfigDict(manifest.config)
        name = config.distribution.strategy
        config.distribution.strategy = self._strategy or (
            "auto" if name == "multi_worker" else name
        )
        if self._data_dir is not None:
            config.dataset.data_dir = self._data_dir
        self.setup = setup_lib.prepare(config)
        self.state = state_lib.build_state(self.setup)
        self.checkpointer = checkpointing.Checkpointer(
            self.state.checkpoint,
            self.workdir,
            is_chief=False,
            worker_index=0,
            max_to_keep=1,
            read_only=True,
        )
        self.eval_loop = loop.make_eval_loop(strategy=self.setup.strategy, model=self.state.model)
        self.eval_dataset, self.eval_steps = self.setup.eval_input()
        self._built = True

    def evaluate(self, step: int) -> dict[str, float]:
        """Restores ckpt-STEP and evaluates it; records the result in eval.jsonl and TensorBoard.

        Raises:
          CheckpointError: the checkpoint is gone (pruned meanwhile), incomplete, or of another
            model; anything `tf.train.Checkpoint.read` raises for a damaged one.
        """
        if not self._built:
            self._build(checkpointing.read_manifest(os.path.join(self.directory, f"ckpt-{step}")))
        manifest = self.checkpointer.restore(step, state_lib.manifest(self.setup, self.state))
        metrics = loop.evaluate(self.eval_loop, self.eval_dataset, self.eval_steps, self.state.ema)
        self._record(manifest, metrics)
        return metrics

    def _record(self, manifest: checkpointing.Manifest, metrics: dict[str, float]) -> None:
        record = {
            "step": manifest.step,
            "examples_seen": manifest.examples_seen,
            **metrics,
            "checkpoint": f"ckpt-{manifest.step}",
            "time": time.time(),
        }
        with tf.io.gfile.GFile(os.path.join(self.workdir, RESULTS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._summary is None:
            self._summary = tf.summary.create_file_writer(
                os.path.join(self.workdir, TENSORBOARD_RUN)
            )
        with self._summary.as_default(step=manifest.step):
            for name, value in metrics.items():
                tf.summary.scalar(name, value)
        self._summary.flush()
        total = manifest.plan["total_steps"]
        logging.info(
            "eval | step: %d/%d | %s",
            manifest.step,
            total,
            " | ".join(f"{k}: {v:.5g}" for k, v in metrics.items()),
        )


def evaluated_steps(workdir: str) -> set[int]:
    """Steps already in eval.jsonl (lines that are not records, e.g. a torn last one, skipped)."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not tf.io.gfile.exists(path):
        return set()
    steps = set()
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            try:
                steps.add(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return steps


def _completes_plan(manifest: checkpointing.Manifest) -> bool:
    """True for the run's last checkpoint: its examples complete the plan it was written with."""
    plan = manifest.plan
    return manifest.examples_seen // plan["global_batch_size"] >= plan["total_steps"]


def evaluate_latest(workdir: str, **evaluator_args) -> tuple[int, dict[str, float]]:
    """Evaluates the newest complete checkpoint of `workdir`; returns (step, metrics).

    Raises:
      CheckpointError: the run has no complete checkpoint.
    """
    _, manifest = checkpointing.find_checkpoint(workdir)
    return manifest.step, Evaluator(workdir, **evaluator_args).evaluate(manifest.step)


def watch(
    workdir: str, *, timeout: float = 0, poll_seconds: float = 10, **evaluator_args
) -> list[tuple[int, dict[str, float]]]:
    """Evaluates each new complete checkpoint until one completes the run's plan, or `timeout`
    seconds pass without a new one (0 = no limit); returns the (step, metrics) evaluated."""
    evaluator = Evaluator(workdir, **evaluator_args)
    directory = evaluator.directory
    done = evaluated_steps(workdir)
    last = max(done, default=-1)
    results = []
    waiting_since = time.monotonic()
    while True:
        newer = [s for s in checkpointing.complete_steps(directory) if s > last]
        if newer:
            step = newer[0]
            try:
                results.append((step, evaluator.evaluate(step)))
            # Gone (pruned by the trainer meanwhile) or damaged: the trainer would not use it
            # either; the next checkpoint is evaluated.
            except (checkpointing.CheckpointError, tf.errors.OpError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else error
                logging.warning("skipping ckpt-%d: %s", step, reason)
            last, waiting_since = step, time.monotonic()
            prefix = os.path.join(directory, f"ckpt-{step}")
            if tf.io.gfile.exists(prefix + ".manifest.json") and _completes_plan(
                checkpointing.read_manifest(prefix)
            ):
                logging.info("eval | ckpt-%d completes the run's plan; done", step)
                return results
            continue
        if timeout and time.monotonic() - waiting_since >= timeout:
            logging.warning(
                "eval | no new checkpoint in %s for %.0f s (--timeout); stopping",
                directory,
                timeout,
            )
            return results
        time.sleep(poll_seconds)


def main(argv: list[str]) -> None:
    del argv
    evaluator_args = {"strategy": _STRATEGY.value, "data_dir": _EVAL_DATA_DIR.value}
    workdir = cli.WORKDIR.value
    if _WATCH.value:
        watch(workdir, timeout=_TIMEOUT.value, poll_seconds=_POLL_SECONDS.value, **evaluator_args)
    else:
        evaluate_latest(workdir, **evaluator_args)


if __name__ == "__main__":
    cli.run(main, "workdir")

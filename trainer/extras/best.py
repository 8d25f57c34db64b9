"""The best eval so far: its checkpoint and export kept in WORKDIR/export/best/, across resumes.

`best_metric` (an eval metric, "" = off; with an EMA of the weights, an `ema_` one, since the
exports hold the averages) and `best_mode` (max | min) choose what "best" means.
After an eval whose checkpoint is written, `BestKeeper.update` compares the metric with the best
so far and, if it is strictly better, replaces WORKDIR/export/best/ whole:

  (the export)              SavedModel, model.keras, export.json (see trainer/export)
  checkpoint/ckpt-STEP.*    a copy of the checkpoint (with TF's `checkpoint` state file), usable
                            as `init_checkpoint` or with plain `tf.train.Checkpoint`
  best.json                 {"metric", "mode", "value", "step", "examples_seen", "eval"}

Why the best value lives in best.json and not in the checkpoint: the value and the files it
describes are replaced together (one directory rename), so they cannot disagree. A run that
resumes from an older checkpoint (a crash, a NaN recovery) keeps the best model it already
has: that model was really trained and evaluated, and replaying the same steps gives the same
value, which does not replace it (ties keep the earlier one).
"""

import json
import math
import os

import ml_collections
import tensorflow as tf
from absl import logging

from trainer import checkpointing, export, task
from trainer.actions import Action, Decision
from trainer.errors import ConfigError

MODES = ("max", "min")
BEST_FILE = "best.json"


def check_config(config: ml_collections.ConfigDict, eval_names: tuple[str, ...]) -> None:
    """Validates `best_metric` / `best_mode` against the run's eval metrics (`eval_names`).

    Raises:
      ConfigError: an unknown metric or mode, or a mode that would keep the worst checkpoint.
    """
    metric, mode = config.best_metric, config.best_mode
    if not metric:
        return
    if metric not in eval_names:
        raise ConfigError(
            f"best_metric ({metric!r}) is not an eval metric of this run; use one of "
            f"{', '.join(eval_names)}, or '' to keep no best checkpoint"
        )
    if config.ema_decay > 0 and not metric.startswith(task.EMA_PREFIX):
        raise ConfigError(
            f"best_metric ({metric!r}) judges the raw weights, but with ema_decay > 0 exports "
            f"hold the averaged ones; use --config.best_metric={task.EMA_PREFIX}{metric}"
        )
    if mode not in MODES:
        raise ConfigError(f"best_mode ({mode!r}) is not one of {', '.join(MODES)}")
    better = task.better(metric)
    if mode != better:
        raise ConfigError(
            f"best_mode ({mode!r}) would keep the worst {metric}; use --config.best_mode={better}"
        )


class BestKeeper:
    """Decides whether an eval is the best so far and keeps its checkpoint and export.

    Call `update` on the chief only, after the checkpoint of the evaluated step is written.
    """

    def __init__(self, workdir: str, *, metric: str, mode: str):
        self.workdir = workdir
        self.directory = export.export_directory(workdir, "best")
        self.metric, self.mode = metric, mode
        self.best: dict | None = self._read()

    def _read(self) -> dict | None:
        """The best so far from best.json; None if there is none for this metric and mode."""
        export.recover_directory(self.directory)
        path = os.path.join(self.directory, BEST_FILE)
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            best = json.load(f)
        if (best.get("metric"), best.get("mode")) != (self.metric, self.mode):
            logging.warning(
                "%s is the best %s (%s) of an earlier setting; keeping the best %s (%s) from "
                "now on, which replaces it at the next eval",
                path,
                best.get("metric"),
                best.get("mode"),
                self.metric,
                self.mode,
            )
            return None
        return best

    def improves(self, eval_metrics: dict[str, float]) -> bool:
        """True if `eval_metrics` is strictly better than the best so far (a NaN never is)."""
        value = eval_metrics[self.metric]
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best["value"]
        return value < self.best["value"]

    def update(self, step: int, eval_metrics: dict[str, float]) -> bool:
        """Keeps the run's checkpoint at `step` if its eval is the best so far.

        Returns whether it did. Costs an export (a model rebuild and a SavedModel write, a few
        seconds) only when the eval improves.

        Raises:
          CheckpointError: there is no complete checkpoint at `step` (save before calling).
        """
        if not self.improves(eval_metrics):
            return False
        prefix, manifest = checkpointing.find_checkpoint(self.workdir, step)
        best = {
            "metric": self.metric,
            "mode": self.mode,
            "value": eval_metrics[self.metric],
            "step": step,
            "examples_seen": manifest.examples_seen,
            "eval": eval_metrics,
            "checkpoint": f"checkpoint/ckpt-{step}",
        }

        def add_checkpoint_and_record(staging: str) -> None:
            directory = os.path.join(staging, "checkpoint")
            tf.io.gfile.makedirs(directory)
            for path in tf.io.gfile.glob(prefix + ".*"):
                tf.io.gfile.copy(path, os.path.join(directory, os.path.basename(path)))
            checkpointing.write_state_file(directory, [step])
            with tf.io.gfile.GFile(os.path.join(staging, BEST_FILE), "w") as f:
                json.dump(best, f, indent=1, sort_keys=True)

        export.export_checkpoint(prefix, manifest, self.directory, add_checkpoint_and_record)
        previous = self.best
        self.best = best
        logging.info(
            "best | step: %d | %s: %.5g (was %s) | wrote %s",
            step,
            self.metric,
            best["value"],
            "none" if previous is None else f"{previous['value']:.5g} at step {previous['step']}",
            self.directory,
        )
        return True


class BestAction(Action):
    """With `best_metric`, every eval asks for a checkpoint (on every worker alike: a
    multi-worker save is collective) and, once it is written, the chief keeps it if it is the
    best so far."""

    def __init__(self, keeper: BestKeeper | None):
        self._keeper = keeper  # None on workers other than the chief: file work is the chief's.
        self._judged: dict[str, float] | None = None

    @classmethod
    def from_run(cls, run) -> "BestAction":
        keeper = None
        if run.topology.is_chief:
            config = run.config
            keeper = BestKeeper(run.workdir, metric=config.best_metric, mode=config.best_mode)
        return cls(keeper)

    def after_eval(self, run, eval_metrics: dict[str, float]) -> Decision:
        del run
        self._judged = eval_metrics
        return Decision(save=True)

    def after_save(self, run) -> None:
        if self._judged is not None and self._keeper is not None:
            self._keeper.update(run.step, self._judged)
        self._judged = None

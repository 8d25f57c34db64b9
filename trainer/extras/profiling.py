"""A TensorBoard profile of chosen train steps (`profile_steps`), recorded on the chief.

`profile_steps = (start, end)` profiles the updates after step `start` up to step `end` (the
steps of metrics.jsonl on the plan's axis: (20, 25) covers updates 21 to 25). The inner loop
runs up to `steps_per_loop` updates per call, so the outer loop also stops at `start` and `end`
(`next_stop`): the profiler starts and stops at exactly those loop boundaries, at the
cost of one or two shorter inner loops (no retracing: their length is a tensor).

Each inner-loop call, with the host sync that reads its outputs, is one profiler step
(`tf.profiler.experimental.Trace("train", step_num=..., _r=1)`), numbered by the step it starts
from; so the trace viewer and the input-pipeline analyzer see steps of up to `steps_per_loop`
updates. The profile goes to WORKDIR/tensorboard/plugins/profile/RUN/HOST.xplane.pb, where
TensorBoard's Profile tab (the tensorboard-plugin-profile package) finds it.

A run resumed inside the range profiles the rest of it; one resumed after it records nothing.
"""

import contextlib
import os
from collections.abc import Iterator

import tensorflow as tf
from absl import logging

from trainer.actions import Action, Phase
from trainer.errors import ConfigError


def check_config(profile_steps: tuple, total_steps: int | None = None) -> None:
    """`profile_steps` is () or (start, end) with 0 <= start < end (<= total_steps when known).

    Raises:
      ConfigError: naming the value and the fix.
    """
    if len(profile_steps) == 0:
        return
    hint = "e.g. --config.profile_steps='(20, 25)', or () for no profile"
    if len(profile_steps) != 2 or not all(isinstance(s, int) for s in profile_steps):
        raise ConfigError(
            f"profile_steps ({profile_steps!r}) must be two steps (start, end); {hint}"
        )
    start, end = profile_steps
    if not 0 <= start < end:
        raise ConfigError(f"profile_steps ({profile_steps!r}) needs 0 <= start < end; {hint}")
    if total_steps is not None and end > total_steps:
        raise ConfigError(
            f"profile_steps ({profile_steps!r}) ends after the run's {total_steps} steps; "
            f"use an end <= {total_steps}"
        )


class StepProfiler(Action):
    """Starts and stops TF's profiler around the inner loops of `profile_steps` (an action)."""

    def __init__(self, logdir: str, profile_steps: tuple, *, enabled: bool):
        self._logdir = logdir
        self._range = tuple(profile_steps) if enabled else ()
        self._active = False

    @classmethod
    def from_run(cls, run) -> "StepProfiler":
        return cls(
            os.path.join(run.workdir, "tensorboard"),
            run.config.profile_steps,
            enabled=run.topology.is_chief,
        )

    def next_stop(self, plan_step: int) -> int | None:
        """The range's ends, on every worker alike: the profiler acts at exactly those steps."""
        later = [step for step in self._range if step > plan_step]
        return min(later) if later else None

    def around(self, phase: Phase) -> contextlib.AbstractContextManager:
        if phase.what != "train loop":
            return contextlib.nullcontext()
        return self.inner_loop(phase.plan_step, phase.num_steps)

    @contextlib.contextmanager
    def inner_loop(self, plan_step: int, num_steps: int) -> Iterator[None]:
        """Around one inner-loop call from `plan_step`: starts the profiler if this call begins
        the range, marks the call as a profiler step, and stops once the range is done."""
        if self._range and not self._active and self._range[0] <= plan_step < self._range[1]:
            tf.profiler.experimental.start(self._logdir)
            self._active = True
        if not self._active:
            yield
            return
        with tf.profiler.experimental.Trace("train", step_num=plan_step, _r=1):
            yield
        if plan_step + num_steps >= self._range[1]:
            self.stop()

    def close(self) -> None:
        self.stop()  # A run stopped inside profile_steps still writes its profile.

    def stop(self) -> None:
        """Writes the profile, if one is being recorded (also when the run stops early)."""
        if not self._active:
            return
        self._active = False
        tf.profiler.experimental.stop()
        logging.info("profile | steps: %s | wrote %s/plugins/profile", self._range, self._logdir)

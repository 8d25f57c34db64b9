"""Profiling: `profile_steps` checked at start-up, the loop stopping at its ends, and a run
leaving a TensorBoard profile whose step markers are the requested steps."""

import glob
import os

import pytest
import testutil
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from trainer import actions, config_check, metrics, train
from trainer import plan as plan_lib
from trainer.errors import ConfigError
from trainer.extras import profiling


@pytest.mark.parametrize(
    "steps, error",
    [
        ((), None),
        ((20, 25), None),
        ((0, 600), None),
        ((25, 20), r"needs 0 <= start < end; e.g. --config.profile_steps='\(20, 25\)'"),
        ((5, 5), "needs 0 <= start < end"),
        ((-1, 3), "needs 0 <= start < end"),
        ((5,), "must be two steps"),
        ((1.5, 3), "must be two steps"),
        ((20, 601), "ends after the run's 600 steps; use an end <= 600"),
    ],
)
def test_check_config(steps, error):
    config = testutil.config_with(profile_steps=steps)  # total_steps: 600.

    def check():  # As setup.prepare does: the config, then the plan it makes.
        config_check.check_config(config)
        plan = plan_lib.make_plan(config, num_replicas=1, num_workers=1, train_examples=1000)
        config_check.check_plan(config, plan)

    if error is None:
        check()
    else:
        with pytest.raises(ConfigError, match=error):
            check()


def test_the_inner_loop_stops_where_the_profile_starts_and_ends():
    profiler = profiling.StepProfiler("/unused", (20, 25), enabled=True)
    stops, step = [], 0
    while step < 100:  # As the outer loop does with steps_per_loop and log_every_steps 50.
        step = min(actions.Actions([profiler]).next_stop(step) + [(step // 50 + 1) * 50])
        stops.append(step)
    assert stops == [20, 25, 50, 100]


def _train_step_markers(path: str) -> list[int]:
    """The step_num of every "train" event (a `Trace(..., _r=1)`) in an .xplane.pb file."""
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    steps = []
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                if plane.event_metadata[event.metadata_id].name != "train":
                    continue
                for stat in event.stats:
                    if plane.stat_metadata[stat.metadata_id].name == "step_num":
                        steps.append(stat.int64_value or stat.uint64_value)
    return sorted(steps)


@pytest.mark.slow
def test_a_run_records_a_profile_of_the_requested_steps(tmp_path, data_dir):
    config = testutil.tiny_run_config(
        data_dir, eval_every_steps=20, export_at_end=False, profile_steps=(7, 12)
    )
    train.train_and_evaluate(config, str(tmp_path))
    traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    # Loops from step 7 (to 10, a log step) and from 10 (to 12): exactly updates 8 to 12.
    assert _train_step_markers(traces[0]) == [7, 10]
    logged = [r["step"] for r in metrics.read_records(str(tmp_path)) if "loss" in r]
    assert logged == [5, 10, 15, 20]  # The extra loop boundaries log nothing.

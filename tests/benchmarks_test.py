"""benchmarks/loop_overhead.py at toy size, so a change of the trainer's API cannot break it unseen.

The numbers are not checked (this machine is shared and the sizes are tiny); that the measured
loops really trained and did not retrace is.
"""

import importlib.util
import json
import os
import sys

import pytest
import testutil

from trainer.datasets import shapes


def _load_script(name: str):
    """A benchmark script as a module: it defines its flags only when run as a script."""
    path = os.path.join(testutil.REPO, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


loop_overhead = _load_script("loop_overhead")


def _tiny_config(data_dir):
    """What the script measures (the default config), with a model and a split that take
    seconds less to trace and load: this checks the trainer's API, not its speed."""
    return testutil.config_with(
        **{
            "dataset.data_dir": data_dir,
            "dataset.train_split": "train[:1024]",
            "model.name": "mlp",
            "model.width": 8,
        }
    )


def test_loop_overhead_measures_both_loops(data_dir):
    """1 replica: what the script reads of the trainer's API is the same on any strategy."""
    strategy = loop_overhead.strategy_for(1)
    result = loop_overhead.measure_loops(
        strategy, _tiny_config(data_dir), steps=2, steps_per_loop=1, repeats=1
    )
    assert result["replicas"] == 1
    assert result["minimal_steps_per_sec"] > 0
    assert result["trainer_loop_steps_per_sec"] > 0
    assert result["retraces"] == 0  # The warm-up call traced; the two timed calls did not.
    assert result["trainer_updates"] == 1 + 2  # The warm-up call, then 2 loops of 1 step.


def test_loop_overhead_refuses_steps_shorter_than_a_loop(data_dir):
    with pytest.raises(ValueError, match=r"steps \(1\) must be at least steps_per_loop \(2\)"):
        loop_overhead.measure_loops(
            loop_overhead.strategy_for(1),
            _tiny_config(data_dir),
            steps=1,
            steps_per_loop=2,
            repeats=1,
        )


@pytest.mark.slow
def test_loop_overhead_script_runs_end_to_end(data_dir):
    """The script as documented, tiny and on 1 replica: its flags, both loops, the outer loop in
    a `python -m trainer.main` process, and its report."""
    shapes.load_or_prepare(data_dir)  # Prepared here: TFDS would print to the script's stdout.
    result = testutil.run_command(
        [
            sys.executable,
            "benchmarks/loop_overhead.py",
            f"--data_dir={data_dir}",
            "--replicas=1",
            "--steps=2",
            "--steps_per_loop=1",
            "--repeats=1",
        ]
    )
    loops, outer = json.loads(result.stdout)
    assert loops["replicas"] == 1
    assert loops["retraces"] == 0 and loops["trainer_updates"] == 3
    outer = outer["outer_loop"]
    assert outer["steps_measured"] == 2  # Logged after the first inner loop, then 2 steps on.
    assert outer["train_main_steps_per_sec"] > 0
    assert outer["checkpoint_bytes_default_config"] > 0


def test_accelerator_benchmark_measures_both_loops_at_toy_size():
    accelerator = _load_script("accelerator")
    result = accelerator.measure(
        "mlp", "mixed_bfloat16", False, image_size=4, batch_size=4, steps=2, steps_per_loop=1
    )
    assert result["tfscale_seconds_per_step"] > 0 and result["fit_seconds_per_step"] > 0
    # The MLP of width 32 on 4x4x3 images: two dense ReLU layers of 256 and a 10-way classifier,
    # each a matmul (2 FLOPs per multiply-add) and a bias add.
    layers = [(48, 256), (256, 256), (256, 10)]
    assert result["forward_flops_per_image"] == sum(2 * i * o + o for i, o in layers)

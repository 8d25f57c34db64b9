"""A quiet console: TensorFlow's start-up chatter hidden by default, shown with --tf_log_level."""

import os
import subprocess
import sys

import pytest
import testutil

from trainer import cli

# What TF 2.21 prints on a CPU machine while it starts (two of these batches, then the probe).
_START_UP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796166769.887500   22323 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results.
I0000 00:00:1796166769.887937   22323 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796166770.024608   22323 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796166788.208462   22323 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""  # noqa: E501


def test_start_up_chatter_is_dropped_and_anything_else_kept():
    other = "W0000 00:00:1.0 1 some_op.cc:1] something this run should know\n"
    assert cli.without_start_up_noise(_START_UP + other) == other


def test_a_cuinit_failure_is_kept_where_a_driver_exists():
    line = "E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE\n"
    assert cli.without_start_up_noise(line) == line


@pytest.mark.parametrize(
    "argv, environment, level",
    [
        ([], None, 2),
        ([], "1", 1),
        (["--tf_log_level=0"], "3", 0),
        (["--tf_log_level", "3"], None, 3),
        (["--tf_log_level=abc"], None, 2),  # The flag parser rejects it afterwards.
    ],
)
def test_log_level_from_the_flag_then_the_environment_then_2(argv, environment, level, monkeypatch):
    if environment is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", environment)
    assert cli.tf_log_level(["tool", *argv]) == level


_NOISE = ("oneDNN", "cuda", "cuInit", "absl::InitializeLog", "cpu_feature_guard")


@pytest.mark.slow  # Two short runs of `python -m trainer.main` in fresh processes.
def test_default_console_is_quiet_and_tf_log_level_0_shows_tensorflow(tmp_path, data_dir):
    overrides = (
        "--config.total_steps=4",
        "--config.steps_per_loop=2",
        "--config.log_every_steps=2",
        "--config.eval_every_steps=4",
        "--config.checkpoint_every_steps=4",
        "--config.lr.warmup_steps=1",
        "--config.model.name=mlp",
        "--config.model.width=8",
    )
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}

    def console(workdir, *extra: str) -> list[str]:
        command = testutil.main_command(workdir, *overrides, *extra, data_dir=data_dir)
        result = subprocess.run(
            command, cwd=testutil.REPO, env=environment, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return (result.stdout + result.stderr).splitlines()

    quiet = console(tmp_path / "quiet")
    assert not [line for line in quiet if any(word in line for word in _NOISE)], quiet
    assert sum(line.startswith("plan | replicas: 1") for line in quiet) == 1
    assert sum(line.startswith("train | step: ") for line in quiet) == 2
    assert sum(line.startswith("eval | step: 4/4") for line in quiet) == 1
    # The plan, one line per log and eval, a few one-time notes (TFDS's three lines when it
    # prepares the dataset on first use); nothing per step, nothing from TF's start-up.
    assert len(quiet) <= 10, quiet

    verbose = console(tmp_path / "verbose", "--tf_log_level=0")
    assert any("oneDNN" in line for line in verbose)
    assert any(line.startswith("train | step: 4/4") for line in verbose)


def test_a_tool_that_fails_during_start_up_shows_everything(tmp_path):
    """If importing TensorFlow fails, what it printed is the diagnosis: nothing is hidden."""
    script = (
        "import sys, builtins\n"
        "from trainer import cli\n"
        "real = builtins.__import__\n"
        "def failing(name, *a, **k):\n"
        "    if name == 'tensorflow':\n"
        "        sys.stderr.write('oneDNN custom operations are on\\n')\n"
        "        raise ImportError('libcudart.so: cannot open shared object file')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = failing\n"
        "cli.start_tensorflow(sys.argv)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=testutil.REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "oneDNN custom operations are on" in result.stderr
    assert "cannot open shared object file" in result.stderr

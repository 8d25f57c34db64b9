"""What a fork does to the template, on copies of the repository: edit trainer/task.py only, or
delete trainer/extras/; each copy then trains the default config from its own root."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import testutil
from tensorboard.backend.event_processing import event_accumulator

from trainer import metrics


def _documented_task_edit() -> str:
    """The example in trainer/task.py's docstring (a top-2 accuracy and label smoothing 0.1),
    as a fork would paste it at the end of that file: the test runs what the docs show."""
    source = (Path(testutil.REPO) / "trainer" / "task.py").read_text()
    example = ast.get_docstring(ast.parse(source)).split("label smoothing::\n", 1)[1]
    return "\n\n" + textwrap.dedent(example) + "\n"  # The docstring ends with the example.


SHORT = (  # The default config, 40 steps.
    "--config.total_steps=40",
    "--config.steps_per_loop=10",
    "--config.log_every_steps=10",
    "--config.eval_every_steps=20",
    "--config.checkpoint_every_steps=20",
    "--config.export_at_end=False",
    "--config.lr.warmup_steps=10",
)


def _copy(tmp_path, name: str):
    """The parts of the repository a run needs, as a fork's checkout would have them."""
    root = tmp_path / name
    for part in ("trainer", "configs"):
        shutil.copytree(
            os.path.join(testutil.REPO, part),
            root / part,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    return root


# `python -m trainer.main`, except that this repository's editable install (pip install -e) may
# not fill in a module the copy lacks: its finder would find trainer/extras/ here. A fork's own
# checkout has no other tfscale to fall back on.
_MAIN_OF_THE_COPY = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'EditableFinder' not in repr(f)]; "
    "runpy.run_module('trainer.main', run_name='__main__', alter_sys=True)"
)


def _run(root, workdir, *overrides: str, data_dir: str, check: bool = True):
    """The trainer from the copy's root, so the copy's trainer is the one imported."""
    command = [sys.executable, "-c", _MAIN_OF_THE_COPY]
    command += testutil.main_flags(workdir, *SHORT, *overrides, data_dir=data_dir)
    env = {**testutil.ENV, "PYTHONPATH": str(root)}
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-4000:]}")
    return result


def _tags(workdir, run: str) -> set[str]:
    accumulator = event_accumulator.EventAccumulator(str(workdir / "tensorboard" / run))
    accumulator.Reload()
    return set(accumulator.Tags()["tensors"])


@pytest.mark.slow
def test_a_fork_that_edits_only_task_py_gets_its_metric_and_loss_everywhere(tmp_path, data_dir):
    unchanged, forked = _copy(tmp_path, "unchanged"), _copy(tmp_path, "forked")
    edit = _documented_task_edit()
    assert "label_smoothing=0.1" in edit and '"top2_accuracy"' in edit
    with open(forked / "trainer" / "task.py", "a") as f:
        f.write(edit)
    _run(unchanged, tmp_path / "unchanged_run", data_dir=data_dir)
    workdir = tmp_path / "forked_run"
    _run(
        forked,
        workdir,
        "--config.best_metric=eval_top2_accuracy",
        "--config.lr.plateau_metric=eval_top2_accuracy",
        "--config.lr.plateau_mode=max",
        data_dir=data_dir,
    )
    records = metrics.read_records(str(workdir))
    train = [r for r in records if "examples_per_sec" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert [r["step"] for r in evals] == [20, 40]
    for record in train:  # Top-2 is at least top-1, and a fraction.
        assert record["accuracy"] <= record["top2_accuracy"] <= 1.0
    for record in evals:
        assert record["eval_accuracy"] <= record["eval_top2_accuracy"] <= 1.0
    # TensorBoard: the same tag in the train and eval runs, so their curves overlay.
    assert "metrics/top2_accuracy" in _tags(workdir, "train") & _tags(workdir, "eval")
    # best_metric judged it (best.json names it and its value)...
    with open(workdir / "export" / "best" / "best.json") as f:
        best = json.load(f)
    assert best["metric"] == "eval_top2_accuracy"
    assert best["value"] == max(r["eval_top2_accuracy"] for r in evals)
    # ...and the loss is the smoothed one: not the unchanged copy's, from the same weights on.
    plain = metrics.read_records(str(tmp_path / "unchanged_run"))
    plain_train = [r for r in plain if "examples_per_sec" in r]
    assert "top2_accuracy" not in plain_train[0]
    assert train[0]["loss"] != plain_train[0]["loss"]
    first = metrics.read_records(str(workdir), metrics.STEPS_FILE)[0]
    first_plain = metrics.read_records(str(tmp_path / "unchanged_run"), metrics.STEPS_FILE)[0]
    assert first["step"] == first_plain["step"] == 1
    assert first["loss"] != first_plain["loss"]  # The same weights, another loss function.


@pytest.mark.slow
def test_without_extras_the_default_config_trains_resumes_and_names_a_missing_one(
    tmp_path, data_dir
):
    root = _copy(tmp_path, "core")
    shutil.rmtree(root / "trainer" / "extras")
    workdir = tmp_path / "run"
    _run(root, workdir, "--config.total_steps=20", data_dir=data_dir)
    resumed = _run(root, workdir, data_dir=data_dir)  # 40 steps: resumes from step 20.
    assert "resumed at step 20" in resumed.stderr
    steps = [r["step"] for r in metrics.read_records(str(workdir)) if "examples_per_sec" in r]
    assert steps == [10, 20, 30, 40]
    for fields, feature in [
        ("--config.best_metric=eval_accuracy", "best"),
        ("--config.ema_decay=0.99", "ema"),
        ("--config.lr.plateau_metric=eval_loss", "lr_control"),
    ]:
        result = _run(root, tmp_path / feature, fields, data_dir=data_dir, check=False)
        assert result.returncode == 1
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and f"trainer/extras/{feature}.py is not in" in lines[0], lines
        assert not (tmp_path / feature).exists()  # Refused before anything was written.

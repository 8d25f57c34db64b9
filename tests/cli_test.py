"""Tests for start-up validation: bad flags and config values end as one line, before any file
is written (trainer/cli.py flag parsing, config_check.check_config and the modules it calls)."""

import math
import re
import sys
from unittest import mock

import keras
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import testutil
from absl import flags

from configs import adamw_sqrt, imagenet_resnet50
from configs import default as default_config
from trainer import cli, config_check, learning_rate, loop, task
from trainer.errors import ConfigError

NAN, INF = float("nan"), float("inf")
DEFAULT = "configs/default.py"


def _reset_flags() -> None:
    """Unparses the flags and drops the `--config.FIELD` flags ml_collections defined while
    parsing: defining one twice in a process is an error, and real tools parse only once."""
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)


def _parse(*args: str):
    """`cli.parse_flags` as `python -m trainer.main ARGS` runs it; returns the parsed config.
    ml_collections reads `sys.argv` for the `--config.FIELD` overrides, so it is set too."""
    argv = ["tool", *args]
    _reset_flags()
    try:
        with mock.patch.object(sys, "argv", argv):
            cli.parse_flags(argv)
            return cli.CONFIG.value
    finally:
        _reset_flags()


def _parse_error(*args: str) -> str:
    """The message `cli.parse_flags` ends the tool with; asserts it is one `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        _parse(*args)
    message = exit_info.value.code
    assert isinstance(message, str), message  # sys.exit(str): printed to stderr, exit code 1.
    assert message.startswith("error: ") and "\n" not in message, message
    return message


_config = testutil.config_with


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "config.py"
    path.write_text(text)
    return str(path)


def test_good_flags_parse_with_the_override_applied():
    config = _parse(f"--config={DEFAULT}", "--config.lr.base=0.05", "--workdir=/tmp/run")
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.lr.base == 0.05


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("--config=nope.py",), ["--config=nope.py", "no such file", "configs/default.py"]),
        (  # With an override ml_collections raises at once; without one, only at first use.
            ("--config=nope.py", "--config.lr.base=0.1"),
            ["--config=nope.py", "no such file"],
        ),
        (("--config", "nope.py"), ["--config=nope.py", "no such file"]),
        (("--config=",), ["--config=", "the path is empty"]),
        (("--config=configs",), ["--config=configs", "it is a directory"]),
        (
            (f"--config={DEFAULT}", "--config.lr.base=abc"),
            ["--config.lr.base=abc", "float", "--config.lr.base=0.2"],
        ),
        (
            (f"--config={DEFAULT}", "--config.model.width=2.5"),
            ["--config.model.width=2.5", "int", "--config.model.width=32"],
        ),
        (
            (f"--config={DEFAULT}", "--config.lr.bse=0.1"),
            ["no such config field 'bse'", "--config.lr.bse", "configs/default.py"],
        ),
    ],
)
def test_bad_config_flag_is_one_line(args, fragments):
    message = _parse_error(*args, "--workdir=/tmp/run")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("def get_config(:\n    pass\n", ["SyntaxError at line 1"]),
        ("import no_such_module\n", ["line 1", "ModuleNotFoundError", "no_such_module"]),
        ("def get_config():\n    return undefined_name\n", ["line 2", "NameError"]),
        ("def get_config():\n    raise ValueError('bad width')\n", ["line 2", "bad width"]),
        ("def get_config():\n    pass\n", ["returned None", "return config"]),
    ],
)
def test_broken_config_file_is_one_line_naming_it(tmp_path, text, fragments):
    path = _write(tmp_path, text)
    message = _parse_error(f"--config={path}", "--workdir=/tmp/run")
    assert f"--config={path}" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("workdir", ["", "  "])
def test_empty_workdir_is_refused(workdir):
    message = _parse_error(f"--config={DEFAULT}", f"--workdir={workdir}")
    assert f"--workdir={workdir}:" in message
    assert "current directory" in message and "--workdir=/tmp/tfscale" in message


@pytest.mark.parametrize(
    "config_module", [default_config, adamw_sqrt, imagenet_resnet50], ids=lambda m: m.__name__
)
def test_shipped_configs_pass(config_module):
    config_check.check_config(config_module.get_config())


def _float_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every float field, placeholders (None by default) included."""
    fields = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            fields += _float_fields(value, f"{prefix}{key}.")
        elif config.get_type(key) is float:
            fields.append(f"{prefix}{key}")
    return fields


FLOAT_FIELDS = _float_fields(default_config.get_config())


def test_float_fields_include_the_ones_read_at_start_up():
    for field in (
        "total_epochs",
        "lr.base",
        "lr.warmup_epochs",
        "optimizer.momentum",
        "optimizer.weight_decay",
        "optimizer.grad_clip_norm",
        "nan_lr_factor",
        "dataset.center_crop_fraction",
        "model.dropout_rate",
    ):
        assert field in FLOAT_FIELDS


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_every_float_field_rejects_non_finite(field, value):
    with pytest.raises(ConfigError) as error:
        config_check.check_config(_config(**{field: value}))
    assert str(error.value).startswith(f"{field} ({value})"), str(error.value)
    assert "finite" in str(error.value)


@pytest.mark.parametrize("value", [NAN, INF])
def test_learning_rate_check_rejects_non_finite_base(value):
    with pytest.raises(ConfigError, match=re.escape(f"lr.base ({value}) must be a finite number")):
        learning_rate.check_config(_config(**{"lr.base": value}).lr)


# (config fields, fragments of the one-line error: the field, its value and the fix)
ERROR_CASES = [
    ({"lr.multipliers": (0.1, NAN)}, ["lr.multipliers ((0.1, nan))", "finite"]),
    ({"lr.milestone_values": (INF,), "lr.milestones": (1,)}, ["lr.milestone_values", "finite"]),
    ({"lr.plateau_metric": "eval_los"}, ["lr.plateau_metric ('eval_los')", "eval_loss"]),
    ({"lr.plateau_metric": "loss"}, ["lr.plateau_metric ('loss')", "eval_accuracy"]),
    ({"model.dropout_rate": 1.5}, ["model.dropout_rate (1.5)", "[0, 1)"]),
    ({"model.dropout_rate": 1.0}, ["model.dropout_rate (1.0)", "[0, 1)"]),
    ({"model.dropout_rate": -0.1}, ["model.dropout_rate (-0.1)", "[0, 1)"]),
    ({"model.width": 0}, ["model.width (0)", "positive"]),
    ({"model.width": -8}, ["model.width (-8)", "positive"]),
    ({"model.name": "vgg"}, ["model.name ('vgg')", "small_cnn"]),
    ({"optimizer.name": "lamb"}, ["optimizer.name ('lamb')", "sgd, adam, adamw"]),
    ({"optimizer.momentum": 1.5}, ["optimizer.momentum (1.5)", "[0, 1]", "0.9"]),
    ({"optimizer.momentum": -0.1}, ["optimizer.momentum (-0.1)", "[0, 1]"]),
    ({"optimizer.beta_1": 1.0}, ["optimizer.beta_1 (1.0)", "[0, 1)"]),
    ({"optimizer.beta_2": -0.5}, ["optimizer.beta_2 (-0.5)", "[0, 1)", "0.999"]),
    ({"optimizer.weight_decay": -1e-4}, ["optimizer.weight_decay (-0.0001)", ">= 0"]),
    ({"optimizer.grad_clip_norm": -1.0}, ["optimizer.grad_clip_norm (-1.0)", "0 = off"]),
    ({"nan_lr_factor": 0.0}, ["nan_lr_factor (0.0)", "(0, 1]"]),
    ({"nan_lr_factor": 2.0}, ["nan_lr_factor (2.0)", "(0, 1]"]),
    ({"nan_max_recoveries": -1}, ["nan_max_recoveries (-1)", ">= 0"]),
    ({"total_epochs": -1.0}, ["total_epochs (-1.0)", "positive"]),
]


@pytest.mark.parametrize(("fields", "fragments"), ERROR_CASES)
def test_config_errors_name_field_value_and_fix(fields, fragments):
    with pytest.raises(ConfigError) as error:
        config_check.check_config(_config(**fields))
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


DEFAULT_EVAL_METRICS = task.eval_metric_names(task.metric_names(10), with_ema=False)


@pytest.mark.parametrize("metric", ["", *DEFAULT_EVAL_METRICS])
def test_plateau_metric_accepts_every_eval_metric(metric):
    config_check.check_config(_config(**{"lr.plateau_metric": metric}))


def test_eval_metrics_are_what_the_eval_loop_returns():
    """The start-up check of lr.plateau_metric is only right if the names are the loop's."""
    strategy = tf.distribute.get_strategy()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    batch = (np.ones((4, 2), np.float32), np.zeros(4, np.int32), np.ones(4, np.float32))
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    eval_loop = loop.make_eval_loop(strategy=strategy, model=model)
    outputs = eval_loop(iter(strategy.experimental_distribute_dataset(dataset)), tf.constant(1))
    assert tuple(outputs) == task.eval_metric_names(task.metric_names(3), with_ema=False)
    assert all(math.isfinite(float(v)) for v in outputs.values())


@pytest.mark.slow
def test_bad_value_ends_main_with_one_line_before_the_workdir_exists(tmp_path):
    workdir = tmp_path / "run"
    result = testutil.run_main(
        workdir,
        "--config.model.dropout_rate=1.5",
        data_dir=str(tmp_path / "tfds"),
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith("error: model.dropout_rate (1.5) must be in [0, 1)")
    assert not workdir.exists()

"""configs/imagenet_resnet50.py as launched, on the offline stand-in for ImageNet.

tfscale_shapes_variable has what ImageNet has and the other tests' data lacks: variable-size images
in ArrayRecord files, so the run reads by index, crops with `inception_crop` and evaluates on
center crops. Only the scale is overridden (batch, durations, image size, CPU replicas).
"""

import json
import signal

import numpy as np
import pytest
import testutil
from testutil import assert_bitwise_equal, logged, wait_for_step

from configs import imagenet_resnet50
from trainer import preemption

pytestmark = pytest.mark.slow

CONFIG = "configs/imagenet_resnet50.py"
TOTAL = 9
# 4000 train examples at 16 per step: 250 steps per epoch, so 0.036 epochs is 9 steps and the
# recipe's warmup and x0.1 boundaries (in epochs, like the real ones) fall at steps 2, 4, 6, 8.
SCALE = (
    "--config.dataset.name=tfscale_shapes_variable",
    "--config.dataset.eval_split=test",
    "--config.dataset.image_size=32",
    "--config.distribution.strategy=mirrored",
    "--config.distribution.cpu_replicas=2",
    "--config.deterministic=True",
    "--config.global_batch_size=16",
    "--config.total_epochs=0.036",
    "--config.lr.warmup_epochs=0.008",
    "--config.lr.boundaries=(0.016,0.024,0.032)",
    "--config.steps_per_loop=3",
    "--config.log_every_steps=3",
    "--config.eval_every_steps=9",
    "--config.max_checkpoints_to_keep=1",
)


def test_the_config_keeps_the_recipe():
    config = imagenet_resnet50.get_config()
    assert (config.dataset.name, config.model.name) == ("imagenet2012", "resnet50")
    assert (config.dataset.image_size, config.dataset.augment) == (224, "inception_crop")
    assert config.dataset.center_crop_fraction == 0.875
    assert (config.lr.base, config.lr.reference_batch_size, config.lr.scaling) == (
        0.1,
        256,
        "linear",
    )
    assert (config.lr.warmup, config.lr.warmup_epochs, config.total_epochs) == ("linear", 5, 90)
    # Warmup from the unscaled LR: peak x reference / global batch = 0.1 at the recipe's batch.
    start = config.lr.warmup_start_fraction * config.lr.base * config.global_batch_size / 256
    assert start == pytest.approx(config.lr.base)
    assert tuple(config.lr.boundaries) == (30, 60, 80)
    assert tuple(config.lr.multipliers) == (0.1, 0.01, 0.001)


def test_resnet50_trains_on_variable_size_images_read_by_index(tmp_path, data_dir):
    # Eval on 32 test examples: 2 steps, not 63, of a ResNet-50 on CPU (the eval input is the
    # same code on any number of examples; the exact-resume tests below read the whole split).
    scale = [f for f in SCALE if "eval_split" not in f] + ["--config.dataset.eval_split=test[:32]"]
    testutil.run_main(
        tmp_path, *scale, "--config.checkpoint_every_steps=9", data_dir=data_dir, config=CONFIG
    )
    peak = 0.1 * 16 / 256
    # Warmup ends at update 2; each x0.1 applies from the update after its boundary (4, 6, 8),
    # as in Keras's PiecewiseConstantDecay: update 6 is still at the first reduction.
    expected = {3: peak, 6: peak * 0.1, 9: peak * 0.001}
    assert dict(logged(tmp_path, "learning_rate")) == pytest.approx(expected, rel=1e-5)
    losses = [loss for _, loss in logged(tmp_path, "loss")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert [step for step, _ in logged(tmp_path, "eval_accuracy")] == [TOTAL]
    manifest = json.loads((tmp_path / "checkpoints" / f"ckpt-{TOTAL}.manifest.json").read_text())
    assert manifest["model"] == "resnet50" and manifest["examples_seen"] == TOTAL * 16
    assert [7, 7, 3, 64] in manifest["model_variables"]  # The stem of a real ResNet-50.


# small_cnn has no residual blocks for the recipe's zero-init of their last BatchNorm.
SMALL = (
    "--config.model.name=small_cnn",
    "--config.model.zero_init_residual=False",
    "--config.checkpoint_every_steps=3",
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("straight")
    testutil.run_main(workdir, *SCALE, *SMALL, data_dir=data_dir, config=CONFIG)
    return workdir


def test_preempted_run_on_records_resumes_bitwise_identical(straight, tmp_path, data_dir):
    """Records, crops and flips are all a function of the position: SIGTERM changes nothing."""
    process = testutil.start_main(
        tmp_path, *SCALE, *SMALL, data_dir=data_dir, config=CONFIG, hold_at_step=6
    )
    wait_for_step(tmp_path, 3, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == preemption.EXIT_CODE_PREEMPTED, stderr[-3000:]
    assert logged(tmp_path, "loss")[-1][0] < TOTAL
    testutil.run_main(tmp_path, *SCALE, *SMALL, data_dir=data_dir, config=CONFIG)
    assert [step for step, _ in logged(tmp_path, "loss")] == [3, 6, 9]
    assert_bitwise_equal(straight, tmp_path, TOTAL, has_dropout=False)

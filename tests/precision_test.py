"""Precision: what `auto` picks on which hardware, and mixed_bfloat16 runs that train like float32
and resume bitwise after a SIGTERM (on CPU; the hardware is faked for the choice)."""

import signal

import keras
import logit_injection
import numpy as np
import pytest
import tensorflow as tf
import testutil
from testutil import assert_bitwise_equal, logged, wait_for_step

from trainer import metrics, precision, preemption
from trainer.errors import ConfigError

AMX = frozenset({"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize(
    ("requested", "device_kind", "capability", "cpu_flags", "policy", "reason"),
    [
        ("auto", "TPU", None, frozenset(), "mixed_bfloat16", "TPU"),
        ("auto", "GPU", (8, 0), frozenset(), "mixed_bfloat16", "8.0 >= 8.0"),
        ("auto", "GPU", (9, 0), frozenset(), "mixed_bfloat16", "9.0 >= 8.0"),
        ("auto", "GPU", (7, 5), AMX, "float32", "7.5 < 8.0"),  # The GPU decides, not the CPU.
        ("auto", "CPU", None, AMX, "mixed_bfloat16", "AMX-BF16"),
        ("auto", "CPU", None, frozenset({"avx512_bf16"}), "float32", "no bfloat16 matrix units"),
        ("float32", "TPU", None, AMX, "float32", "set in the config"),
        ("mixed_bfloat16", "CPU", None, frozenset(), "mixed_bfloat16", "set in the config"),
        ("mixed_float16", "GPU", (7, 0), frozenset(), "mixed_float16", "set in the config"),
        ("mixed_float16", "CPU", None, AMX, "mixed_float16", "400x slower than float32"),
    ],
)
def test_choose(requested, device_kind, capability, cpu_flags, policy, reason):
    chosen = precision.choose(
        requested, device_kind=device_kind, gpu_compute_capability=capability, cpu_flags=cpu_flags
    )
    assert chosen.policy == policy
    assert reason in chosen.reason


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match=r"precision \('bfloat16'\) is not one of auto, float32"):
        precision.choose("bfloat16", device_kind="CPU", gpu_compute_capability=None, cpu_flags=AMX)


def test_loss_scale_halves_on_overflow_and_doubles_after_a_run_of_good_updates():
    scale = precision.LossScale(initial_scale=8.0, growth_interval=3)
    seen = []
    for finite in (True, False, True, True, True, True, False, False, False, False, False):
        scale.update(tf.constant(finite))
        seen.append(float(scale.scale.numpy()))
    # 8 -> (good) 8 -> (overflow) 4 -> 3 good: 8 -> 1 good -> 4, 2, 1, and never below 1.
    assert seen == [8.0, 4.0, 4.0, 4.0, 8.0, 8.0, 4.0, 2.0, 1.0, 1.0, 1.0]
    assert int(scale.skipped.numpy()) == 6


def test_policy_scope_builds_mixed_layers_and_restores_the_global_policy():
    before = keras.mixed_precision.global_policy().name
    with precision.policy_scope("mixed_bfloat16"):
        layer = keras.layers.Dense(2)
        layer.build((None, 3))
    assert (layer.compute_dtype, layer.variable_dtype) == ("bfloat16", "float32")
    assert keras.mixed_precision.global_policy().name == before


# The default config, shortened; Mirrored over 2 logical CPUs.
RUN = (
    "--config.total_steps=200",
    "--config.eval_every_steps=200",
    "--config.checkpoint_every_steps=100",
    "--config.distribution.strategy=mirrored",
    "--config.distribution.cpu_replicas=2",
)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("bf16")
    result = testutil.run_main(
        workdir, *RUN, "--config.precision=mixed_bfloat16", data_dir=data_dir
    )
    assert "precision: mixed_bfloat16 (set in the config)" in result.stderr
    return workdir


@pytest.mark.slow
def test_mixed_bfloat16_trains_like_float32(bf16_run, tmp_path, data_dir):
    testutil.run_main(tmp_path, *RUN, "--config.precision=float32", data_dir=data_dir)
    float32_accuracy = logged(tmp_path, "eval_accuracy")[-1][1]
    bf16_accuracy = logged(bf16_run, "eval_accuracy")[-1][1]
    assert float32_accuracy > 0.5  # Far above chance (0.1): the comparison means something.
    assert abs(bf16_accuracy - float32_accuracy) <= 0.01
    # bfloat16 really was used: its losses differ from float32's beyond round-off.
    losses = [np.array([v for _, v in logged(w, "loss")]) for w in (tmp_path, bf16_run)]
    assert not np.allclose(*losses, rtol=1e-5)


@pytest.mark.slow
def test_mixed_bfloat16_resumes_bitwise_after_sigterm(bf16_run, tmp_path, data_dir):
    process = testutil.start_main(
        tmp_path, *RUN, "--config.precision=mixed_bfloat16", data_dir=data_dir, hold_at_step=100
    )
    wait_for_step(tmp_path, 50, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == preemption.EXIT_CODE_PREEMPTED, stderr[-3000:]
    testutil.run_main(tmp_path, *RUN, "--config.precision=mixed_bfloat16", data_dir=data_dir)
    assert_bitwise_equal(bf16_run, tmp_path, 200, has_dropout=False)


@pytest.mark.slow
def test_mixed_float16_resumes_bitwise_with_its_loss_scale(tmp_path, data_dir, monkeypatch):
    """The scale is checkpointed: a crash and resume end where the straight run does."""
    config = testutil.tiny_run_config(data_dir, precision="mixed_float16", total_steps=30)
    # Crashes after ckpt-20, resumes there.
    straight, resumed = testutil.straight_and_resumed(config, tmp_path, monkeypatch, 25)
    assert_bitwise_equal(straight, resumed, 30, has_dropout=False)
    saved = testutil.checkpoint_values(resumed, 30)
    assert [n for n in saved if n.startswith("loss_scale/scale")]
    records = [r for r in metrics.read_records(str(resumed)) if "loss_scale" in r]
    assert records and all(r["loss_scale"] >= 1 for r in records)


# Logits x this in the chosen update: its float16 backward pass overflows at any usable scale.
OVERFLOW_FACTOR = 1e6


@pytest.mark.slow
def test_mixed_float16_forced_overflow_then_sigterm_resumes_bitwise(
    tmp_path, data_dir, monkeypatch
):
    """An overflow forced at update 15 (the last of a loop) skips exactly that update and halves
    the scale, on 2 replicas; a SIGTERM right after it (at that loop boundary) checkpoints step
    15, and the resumed run ends bitwise where the uninterrupted one with the same overflow does."""
    overflow_at = 15
    config = testutil.tiny_run_config(
        data_dir,
        precision="mixed_float16",
        total_steps=30,
        **{"distribution.strategy": "mirrored", "distribution.cpu_replicas": 2},
    )
    with pytest.MonkeyPatch.context() as injection:  # Stays for all three runs.
        logit_injection.install(
            lambda: overflow_at, lambda: OVERFLOW_FACTOR, None, patch=injection.setattr
        )
        straight, resumed = testutil.straight_and_resumed(
            config, tmp_path, monkeypatch, overflow_at, sigterm=True
        )
    # The preemption's save, complete, at the overflow: the halved scale and one skip in it.
    assert (resumed / "checkpoints" / "ckpt-15.manifest.json").exists()
    saved = testutil.checkpoint_values(resumed, 15)
    assert [saved[n] for n in saved if n.startswith("loss_scale/scale/")] == [2.0**14]
    assert [saved[n] for n in saved if n.startswith("loss_scale/skipped/")] == [1]
    assert_bitwise_equal(straight, resumed, 30, has_dropout=False)
    for workdir in (straight, resumed):
        per_update = metrics.read_records(str(workdir), metrics.STEPS_FILE)
        skipped = [r["step"] for r in per_update if r["skipped"]]
        assert skipped == [overflow_at], workdir
        scales = dict(logged(workdir, "loss_scale"))
        skips = dict(logged(workdir, "overflow_skips"))
        assert {s: scales[s] for s in (10, 15, 20)} == {10: 2.0**15, 15: 2.0**14, 20: 2.0**14}
        assert {s: skips[s] for s in (10, 15, 20)} == {10: 0, 15: 1, 20: 1}

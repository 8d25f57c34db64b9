"""The precision policy: which Keras dtype policy the model is built with, and why.

`auto` picks `mixed_bfloat16` where the hardware multiplies bfloat16 natively (TPUs; NVIDIA
GPUs of compute capability 8.0 or newer; x86 CPUs with AMX-BF16) and float32 elsewhere. Under a
mixed policy the layers compute in bfloat16 and keep float32 variables; the classifier emits
float32 logits (models.py), so the loss, its softmax and the optimizer stay in float32. bfloat16
has float32's exponent range, so no loss scaling is needed. `mixed_float16` (for GPUs whose tensor
cores are float16 only) needs dynamic loss scaling against float16's small range: `LossScale`,
applied by the compiled loop (loop.py).
"""

import contextlib
import dataclasses
from collections.abc import Iterator

import keras
import tensorflow as tf

from trainer import hardware as hardware_lib
from trainer.errors import ConfigError

POLICIES = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class Precision:
    policy: str  # A Keras dtype policy name.
    reason: str  # Why, for the start-up summary.


def choose(
    requested: str,
    *,
    device_kind: str,
    gpu_compute_capability: tuple[int, int] | None,
    cpu_flags: frozenset[str],
) -> Precision:
    """The policy for `requested` on devices of `device_kind` (TPU, GPU or CPU).

    `gpu_compute_capability` is the lowest among the GPUs used; `cpu_flags` are /proc/cpuinfo's.
    """
    if requested not in POLICIES:
        raise ConfigError(f"precision ({requested!r}) is not one of {', '.join(POLICIES)}")
    if requested == "mixed_float16" and device_kind == "CPU":  # Said, not refused: tests use it.
        return Precision(
            requested,
            "set in the config; TF's CPU kernels have no fast float16 path: updates run 150x to "
            "400x slower than float32 (measured, benchmarks/RESULTS.md)",
        )
    if requested != "auto":
        return Precision(requested, "set in the config")
    if device_kind == "TPU":
        return Precision("mixed_bfloat16", "auto: TPU matrix units are bfloat16")
    if device_kind == "GPU":
        major, minor = gpu_compute_capability or (0, 0)
        if major >= 8:
            return Precision(
                "mixed_bfloat16", f"auto: GPU compute capability {major}.{minor} >= 8.0"
            )
        return Precision(
            "float32", f"auto: GPU compute capability {major}.{minor} < 8.0 has no bfloat16 units"
        )
    if "amx_bf16" in cpu_flags:
        return Precision("mixed_bfloat16", "auto: this CPU has AMX-BF16")
    return Precision("float32", "auto: no bfloat16 matrix units on this CPU")


def resolve(
    requested: str, strategy: tf.distribute.Strategy, hardware: hardware_lib.Hardware
) -> Precision:
    """`choose` for the devices `strategy` trains on."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        device_kind, capability = "TPU", None
    elif gpus := tf.config.list_physical_devices("GPU"):
        device_kind = "GPU"
        capability = min(
            tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
            for gpu in gpus
        )
    else:
        device_kind, capability = "CPU", None
    return choose(
        requested,
        device_kind=device_kind,
        gpu_compute_capability=capability,
        cpu_flags=hardware.cpu_flags,
    )


@contextlib.contextmanager
def policy_scope(policy: str) -> Iterator[None]:
    """Layers built inside get `policy`; Keras's global policy is restored afterwards, so one
    process can build models of several precisions (tests, the LR range test)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


class LossScale(tf.Module):
    """Dynamic loss scaling for mixed_float16, as Keras's LossScaleOptimizer does it, in the loop.

    The loss is multiplied by `scale` before the backward pass so small float16 gradients do not
    flush to zero, and the gradients are divided by it again. The loop judges the *all-reduced*
    gradient (its norm is finite or not), so every replica takes the same decision: a non-finite
    one skips the update and halves the scale; `growth_interval` applied updates in a row double
    it. Keras's defaults: 2**15 to start, 2000 updates. The scale, the run of good updates and
    the count of skips are variables (create under `strategy.scope()`), checkpointed, so a
    resumed run scales exactly as an uninterrupted one would.

    A skipped update advances `optimizer.iterations` like a health skip (loop.SpikeGuard): the
    schedule, the step and the input position stay in lock step and the batch counts as
    consumed. Keras's LossScaleOptimizer instead does not count it, which would make the step
    drift from the examples seen, on which resume, milestones and the plan rest.
    """

    def __init__(self, initial_scale: float = 2.0**15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        self.growth_interval = growth_interval
        self.scale = tf.Variable(initial_scale, trainable=False, name="scale")
        self.good_updates = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_updates")
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")

    def update(self, finite: tf.Tensor) -> None:
        """After an update whose all-reduced gradient was `finite` (else it was skipped)."""
        good = tf.where(finite, self.good_updates + 1, 0)
        grow = good >= self.growth_interval
        factor = tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5)
        self.scale.assign(tf.maximum(self.scale * factor, 1.0))
        self.good_updates.assign(tf.where(grow, tf.constant(0, tf.int64), good))
        self.skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))

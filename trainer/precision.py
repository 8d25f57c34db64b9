"""The precision policy: which Keras dtype policy the model is built with, and why.

`auto` picks `mixed_bfloat16` where the hardware multiplies bfloat16 natively (TPUs; NVIDIA
GPUs of compute capability 8.0 or newer; x86 CPUs with AMX-BF16) and float32 elsewhere. Under a
mixed policy the layers compute in bfloat16 and keep float32 variables; the classifier emits
float32 logits (models.py), so the loss, its softmax and the optimizer stay in float32. bfloat16
has float32's exponent range, so no loss scaling is needed. `mixed_float16` needs dynamic loss
scaling, which the compiled loop does not do yet: it is refused rather than run without it.
"""

import contextlib
import dataclasses
from collections.abc import Iterator

import keras
import tensorflow as tf

from trainer import hardware as hardware_lib
from trainer.errors import ConfigError

POLICIES = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
SUPPORTED = ("float32", "mixed_bfloat16")


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
    if requested not in SUPPORTED + ("auto",):
        raise ConfigError(
            f"precision ({requested!r}) needs dynamic loss scaling, which tfscale's loop does not "
            "do yet; use mixed_bfloat16 (GPUs of compute capability 8.0+, TPUs) or float32"
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

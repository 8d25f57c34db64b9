"""What accelerator hardware this host has, read without TensorFlow.

TensorFlow only reports the devices it can use: a GPU box whose `tensorflow` lacks the CUDA
libraries, or a TPU VM without the `tensorflow-tpu` build, looks to it like a CPU-only host, and a
run there would train on the CPU without a word. The probe looks at the host itself (device
files, the driver's tool, the variables Cloud TPU sets), so set-up can tell "no accelerator" from
"an accelerator TensorFlow cannot see" and say which install fixes it. It reads files under
`root` and the given environment, so tests fake the hardware rather than need it.
"""

import dataclasses
import glob
import os
import shutil
from collections.abc import Callable, Mapping

GPU_INSTALL = "pip install -e '.[gpu]' -c constraints/tf2.21-gpu.txt"
TPU_INSTALL = "pip install -r constraints/tf2.20-tpu.txt && pip install --no-deps -e ."


@dataclasses.dataclass(frozen=True)
class Hardware:
    """The host's accelerators as the operating system shows them."""

    nvidia_gpus: int  # /dev/nvidiaN device files (the NVIDIA driver creates one per GPU).
    nvidia_smi: bool  # The driver's tool is on PATH (containers may not expose /dev/nvidiaN).
    tpu_chips: int  # /dev/accelN (TPU v2-v4) or /dev/vfio/N (v5e and newer) device files.
    tpu_accelerator_type: (
        str  # TPU_ACCELERATOR_TYPE (GKE and some images set it), e.g. v5litepod-8.
    )
    cpu_flags: frozenset[str]  # From /proc/cpuinfo, e.g. amx_bf16, avx512_bf16.

    @property
    def has_nvidia_gpu(self) -> bool:
        return self.nvidia_gpus > 0 or self.nvidia_smi

    @property
    def is_tpu_vm(self) -> bool:
        return self.tpu_chips > 0 or bool(self.tpu_accelerator_type)

    def describe(self) -> str:
        """A short description for error messages, e.g. `2 NVIDIA GPU device files`."""
        found = []
        if self.nvidia_gpus:
            found.append(f"{self.nvidia_gpus} NVIDIA GPU device file(s) /dev/nvidiaN")
        elif self.nvidia_smi:
            found.append("nvidia-smi on PATH")
        if self.tpu_chips:
            found.append(f"{self.tpu_chips} TPU chip device file(s)")
        if self.tpu_accelerator_type:
            found.append(f"TPU_ACCELERATOR_TYPE={self.tpu_accelerator_type}")
        return ", ".join(found) or "no accelerator"


def _cpu_flags(cpuinfo: str) -> frozenset[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # Not Linux, or no /proc: nothing known.
        pass
    return frozenset()


def probe(
    root: str = "/",
    environ: Mapping[str, str] = os.environ,
    which: Callable[[str], str | None] = shutil.which,
) -> Hardware:
    """Reads the host's accelerators from device files under `root` and from `environ`."""

    def count(*patterns: str) -> int:
        return sum(len(glob.glob(os.path.join(root, pattern))) for pattern in patterns)

    return Hardware(
        nvidia_gpus=count("dev/nvidia[0-9]*"),
        nvidia_smi=which("nvidia-smi") is not None,
        tpu_chips=count("dev/accel[0-9]*", "dev/vfio/[0-9]*"),
        tpu_accelerator_type=environ.get("TPU_ACCELERATOR_TYPE", ""),
        cpu_flags=_cpu_flags(os.path.join(root, "proc/cpuinfo")),
    )

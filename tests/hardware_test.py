"""The hardware probe and what set-up does with it: no silent CPU run on a GPU box or TPU VM.

The hardware is faked: device files under a temporary root, the environment, `which`.
"""

import pytest

from configs import default as default_config
from trainer import distribute, hardware
from trainer.errors import ConfigError

NO_ACCELERATOR = hardware.Hardware(
    nvidia_gpus=0, nvidia_smi=False, tpu_chips=0, tpu_accelerator_type="", cpu_flags=frozenset()
)
GPU_BOX = hardware.Hardware(
    nvidia_gpus=2, nvidia_smi=True, tpu_chips=0, tpu_accelerator_type="", cpu_flags=frozenset()
)
TPU_VM = hardware.Hardware(
    nvidia_gpus=0, nvidia_smi=False, tpu_chips=4, tpu_accelerator_type="", cpu_flags=frozenset()
)


def _fake_root(tmp_path, files: list[str], cpu_flags: str = "fpu sse avx512_bf16 amx_bf16"):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc" / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {cpu_flags}\n")
    return str(tmp_path)


def test_probe_reads_device_files_environment_and_cpu_flags(tmp_path):
    root = _fake_root(
        tmp_path,
        [
            "dev/nvidia0",
            "dev/nvidia1",
            "dev/nvidiactl",
            "dev/nvidia-uvm",
            "dev/accel0",
            "dev/vfio/0",
            "dev/vfio/vfio",
        ],
    )
    found = hardware.probe(
        root, environ={"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, which=lambda _: None
    )
    assert found.nvidia_gpus == 2  # nvidiactl and nvidia-uvm are not GPUs.
    assert found.tpu_chips == 2  # accel0 and vfio/0; vfio/vfio is the control file.
    assert found.tpu_accelerator_type == "v5litepod-8"
    assert {"amx_bf16", "avx512_bf16"} <= found.cpu_flags
    assert not found.nvidia_smi


def test_probe_of_a_plain_host(tmp_path):
    found = hardware.probe(
        _fake_root(tmp_path, [], cpu_flags="fpu sse"), environ={}, which=lambda _: None
    )
    assert found == hardware.Hardware(0, False, 0, "", frozenset({"fpu", "sse"}))
    assert not found.has_nvidia_gpu and not found.is_tpu_vm
    # nvidia-smi alone (a container without /dev/nvidiaN listed) counts as a GPU host.
    with_smi = hardware.probe(str(tmp_path), environ={}, which=lambda name: f"/usr/bin/{name}")
    assert with_smi.has_nvidia_gpu


def _distribution(strategy: str, devices: str = "auto"):
    config = default_config.get_config().distribution
    config.strategy, config.devices = strategy, devices
    return config


@pytest.mark.parametrize("strategy", ["auto", "default", "one_device", "mirrored", "multi_worker"])
def test_a_gpu_box_whose_tensorflow_sees_no_gpu_is_refused(strategy):
    with pytest.raises(distribute.StrategyError) as error:
        distribute.create_strategy(_distribution(strategy), GPU_BOX)
    message = str(error.value)
    assert "\n" not in message
    assert (
        "has NVIDIA GPUs (2 NVIDIA GPU device file(s) /dev/nvidiaN) but TensorFlow sees none"
        in message
    )
    assert hardware.GPU_INSTALL in message
    assert "--config.distribution.devices=cpu" in message


@pytest.mark.parametrize("strategy", ["auto", "default"])
def test_the_cpu_on_purpose_is_allowed_on_accelerator_hosts(strategy):
    for host in (GPU_BOX, TPU_VM):
        built = distribute.create_strategy(_distribution(strategy, devices="cpu"), host)
        assert built.num_replicas_in_sync == 1
        assert distribute.describe_devices(built) == "1 x CPU"


def test_auto_on_a_tpu_vm_chooses_the_tpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(
        distribute, "_tpu_strategy", lambda tpu: chosen.append(tpu) or "TPUStrategy"
    )
    assert distribute.create_strategy(_distribution("auto"), TPU_VM) == "TPUStrategy"
    assert chosen == [""]  # The TPU VM this runs on.
    # A host without accelerators never tries the TPU.
    assert distribute.create_strategy(_distribution("auto"), NO_ACCELERATOR) != "TPUStrategy"


@pytest.mark.parametrize("strategy", ["default", "mirrored", "one_device"])
def test_a_cpu_strategy_on_a_tpu_vm_is_refused(strategy):
    with pytest.raises(distribute.StrategyError, match=r"is a Cloud TPU VM \(4 TPU chip"):
        distribute.create_strategy(_distribution(strategy), TPU_VM)


@pytest.mark.parametrize(
    ("strategy", "devices", "message"),
    [
        ("auto", "gpu", "distribution.devices ('gpu') is not one of auto, cpu"),
        ("tpu", "cpu", "distribution.devices='cpu' contradicts distribution.strategy='tpu'"),
    ],
)
def test_bad_devices_field(strategy, devices, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distribute.create_strategy(_distribution(strategy, devices), NO_ACCELERATOR)


@pytest.mark.parametrize(
    ("gpu_memory", "calls"),
    [
        ("all", []),
        ("growth", [("growth", "gpu0", True), ("growth", "gpu1", True)]),
        ("20000", [("limit", "gpu0", 20000), ("limit", "gpu1", 20000)]),
    ],
)
def test_gpu_memory_is_configured_per_gpu(monkeypatch, gpu_memory, calls):
    made = []
    monkeypatch.setattr(
        distribute.tf.config.experimental,
        "set_memory_growth",
        lambda gpu, on: made.append(("growth", gpu, on)),
    )
    monkeypatch.setattr(
        distribute.tf.config,
        "set_logical_device_configuration",
        lambda gpu, configs: made.append(("limit", gpu, configs[0].memory_limit)),
    )
    distribute.configure_gpu_memory(["gpu0", "gpu1"], gpu_memory)
    assert made == calls


@pytest.mark.parametrize("gpu_memory", ["half", "0", "-5", ""])
def test_bad_gpu_memory_is_refused_even_without_gpus(gpu_memory):
    config = _distribution("default")
    config.gpu_memory = gpu_memory
    with pytest.raises(ConfigError, match=r"distribution.gpu_memory .* use 'all'"):
        distribute.create_strategy(config, NO_ACCELERATOR)

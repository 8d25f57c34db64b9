"""The documented installs give the supported versions (pyproject.toml, constraints/).

Supported: TensorFlow 2.20 and 2.21 on CPU and GPU (`tensorflow`, `tensorflow[and-cuda]`), and
on Cloud TPU the newest TPU build, `tensorflow-tpu` 2.20.0 with a libtpu that still has TF's TPU
C API. The fast tests read the files and the running environment. The `slow` ones ask pip to
resolve the GPU and TPU installs without installing anything (`pip install --dry-run
--ignore-installed --report`); that needs the package index (PyPI), so they are skipped, saying
why, only when it cannot be reached, and fail instead under CI, which must run them. The index
is all they can see: Google's own wheel pages (libtpu-releases) are not consulted.
"""

import functools
import json
import os
import platform
import subprocess
import sys
import tomllib
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# One constraints/tf<minor>-cpu.txt per supported TensorFlow minor; the CI tests each of them.
CPU_SETS = {"2.20": CONSTRAINTS / "tf2.20-cpu.txt", "2.21": CONSTRAINTS / "tf2.21-cpu.txt"}
TPU_SET = CONSTRAINTS / "tf2.20-tpu.txt"
GPU_SET = CONSTRAINTS / "tf2.21-gpu.txt"
# libtpu releases that export all 220 libtpu functions tensorflow-tpu 2.20.0 looks up (checked
# with `nm -D` on the PyPI wheels): 0.0.14 to 0.0.31. 0.0.32.1-0.0.40 lack one, 0.0.43.2 and
# newer lack 124-142, yet all satisfy tensorflow-tpu's own `libtpu~=0.0.14`.
LIBTPU_WITH_TF_2_20_API = (Version("0.0.14"), Version("0.0.31"))
CUDA_WHEELS = {
    "nvidia-cudnn-cu12",
    "nvidia-cublas-cu12",
    "nvidia-cuda-runtime-cu12",
    "nvidia-nccl-cu12",
}


def _requirements(lines) -> dict[str, Requirement]:
    """name -> Requirement for the requirement lines (not comments, not -c/-r options)."""
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def _pins(path: Path) -> dict[str, Version]:
    """name -> version of a constraints file's `name==version` lines."""
    pins = {}
    for name, requirement in _requirements(path.read_text().splitlines()).items():
        (specifier,) = requirement.specifier  # Exactly one: a pin.
        assert specifier.operator == "==", f"{path.name}: {requirement} is not a pin"
        pins[name] = Version(specifier.version)
    return pins


def _installed(name: str) -> str:
    """The installed version of distribution `name`, "" if there is none (the TPU build is
    `tensorflow-tpu`, not `tensorflow`)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def _minor(version) -> str:
    return ".".join(str(version).split(".")[:2])


DEPENDENCIES = _requirements(PROJECT["dependencies"])
TF_RANGE = DEPENDENCIES["tensorflow"].specifier


# --- Fast: the files agree with each other -----------------------------------------------------


def test_tensorflow_range_is_exactly_the_supported_minors():
    for minor in CPU_SETS:
        assert TF_RANGE.contains(f"{minor}.0"), f"tensorflow {TF_RANGE} leaves out {minor}"
    for outside in ("2.19.1", "2.22.0"):
        assert not TF_RANGE.contains(outside), f"tensorflow {TF_RANGE} admits {outside}, untested"
    assert sorted(CONSTRAINTS.glob("tf*-cpu.txt")) == sorted(CPU_SETS.values())


@pytest.mark.parametrize("minor", sorted(CPU_SETS))
def test_cpu_set_pins_what_pyproject_allows(minor):
    path = CPU_SETS[minor]
    pins = _pins(path)
    tests = _requirements(PROJECT["optional-dependencies"]["test"])
    for name, requirement in {**DEPENDENCIES, **tests}.items():
        assert name in pins, f"{path.name} does not pin {name}"
        assert requirement.specifier.contains(pins[name]), (
            f"{path.name} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )
    assert _minor(pins["tensorflow"]) == minor, f"{path.name} pins tensorflow {pins['tensorflow']}"
    assert _minor(pins["tensorboard"]) == minor, "tensorboard's minor must be TensorFlow's"
    assert "tensorflow-tpu" not in pins and "libtpu" not in pins


def test_gpu_extra_is_tensorflow_and_cuda_over_the_same_range():
    extras = PROJECT["optional-dependencies"]
    (gpu,) = extras["gpu"]
    gpu = Requirement(gpu)
    assert (canonicalize_name(gpu.name), gpu.extras) == ("tensorflow", {"and-cuda"})
    assert gpu.specifier == TF_RANGE


def test_no_extra_brings_tensorflow_tpu():
    """An extra only adds to the base `tensorflow`: a TPU extra would install both builds of
    the `tensorflow` package, one over the other. The TPU install is constraints/tf2.20-tpu.txt."""
    for extra, lines in PROJECT["optional-dependencies"].items():
        names = set(_requirements(lines))
        assert not names & {"tensorflow-tpu", "libtpu"}, f"extra [{extra}] brings a TPU build"


def test_tpu_set_is_pyproject_with_the_tpu_build():
    lines = TPU_SET.read_text().splitlines()
    requirements = _requirements(lines)
    tpu, libtpu = requirements.pop("tensorflow-tpu"), requirements.pop("libtpu")
    expected = {n: r for n, r in DEPENDENCIES.items() if n != "tensorflow"}
    assert {n: str(r.specifier) for n, r in requirements.items()} == {
        n: str(r.specifier) for n, r in expected.items()
    }, "tf2.20-tpu.txt must list pyproject.toml's dependencies, tensorflow replaced"

    (tpu_pin,) = tpu.specifier
    assert tpu_pin.operator == "==" and TF_RANGE.contains(tpu_pin.version)
    (libtpu_pin,) = libtpu.specifier
    low, high = LIBTPU_WITH_TF_2_20_API
    assert libtpu_pin.operator == "==" and low <= Version(libtpu_pin.version) <= high, (
        f"libtpu {libtpu_pin.version}: only {low}-{high} have TF 2.20's TPU C API"
    )
    assert _minor(tpu_pin.version) == "2.20" and f"-c {CPU_SETS['2.20'].name}" in lines
    assert _pins(CPU_SETS["2.20"])["tensorflow"] == Version(tpu_pin.version)


def test_installed_versions_are_a_supported_combination():
    """The environment the tests run in: one TensorFlow build, in range, with its tensorboard."""
    builds = {}
    for name in ("tensorflow", "tensorflow-cpu", "tensorflow-tpu"):
        try:
            builds[name] = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            pass
    assert len(builds) == 1, f"expected one TensorFlow build installed, found {builds}"
    ((build, version),) = builds.items()
    assert TF_RANGE.contains(version), f"{build} {version} is outside pyproject.toml's {TF_RANGE}"
    import tensorflow as tf

    assert tf.__version__ == str(version), f"`import tensorflow` is {tf.__version__}, not {build}"
    tensorboard = Version(metadata.version("tensorboard"))
    assert _minor(tensorboard) == _minor(version), f"tensorboard {tensorboard} with TF {version}"
    for name in ("keras", "tensorflow-datasets", "array-record"):
        installed = metadata.version(name)
        assert DEPENDENCIES[name].specifier.contains(installed), f"{name} {installed}"


# --- Slow: pip resolves the GPU and TPU installs against the index -----------------------------


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


@functools.cache
def _cannot_resolve_here() -> str | None:
    """Why these installs cannot be resolved on this machine, or None."""
    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        here = f"{sys.platform} {platform.machine()}"
        return f"the GPU and TPU wheels are for Linux x86_64, this is {here}"
    url = f"{_index_url()}/tensorflow-tpu/"
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            response.read(1)
    except OSError as error:
        return f"the package index is unreachable ({url}: {error})"
    return None


@pytest.fixture
def index():
    problem = _cannot_resolve_here()
    if problem and os.environ.get("CI"):
        pytest.fail(f"CI must resolve the installs, but {problem}")
    if problem:
        pytest.skip(f"install resolution not run: {problem}")


def _resolve(tmp_path, *args: str) -> dict[str, Version]:
    """name -> version of what `pip install ARGS` would install into an empty environment."""
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
        "--disable-pip-version-check", "--report", str(report), *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"{' '.join(args)} does not resolve:\n{result.stderr[-4000:]}"
    installs = json.loads(report.read_text())["install"]
    return {
        canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"])
        for i in installs
    }


def _assert_supported(resolved: dict[str, Version], tensorflow: str, minor: str):
    """`tensorflow` (the distribution) of `minor`, the other TF build absent, and the project's
    other dependencies in their ranges."""
    other = "tensorflow-tpu" if tensorflow == "tensorflow" else "tensorflow"
    assert other not in resolved, f"both {tensorflow} and {other} would be installed"
    assert _minor(resolved[tensorflow]) == minor, f"{tensorflow} {resolved[tensorflow]}"
    assert TF_RANGE.contains(resolved[tensorflow])
    assert _minor(resolved["tensorboard"]) == minor, f"tensorboard {resolved['tensorboard']}"
    for name, requirement in DEPENDENCIES.items():
        if name != "tensorflow":
            assert requirement.specifier.contains(resolved[name]), f"{name} {resolved[name]}"


def test_gpu_set_pins_the_cuda_wheels_tensorflow_2_21_asks_for():
    """Every NVIDIA wheel of `tensorflow[and-cuda]` is pinned, at the floor TF 2.21.0 declares
    (its build's CUDA 12.5 / cuDNN 9.3), and the rest is the CPU-tested set."""
    lines = GPU_SET.read_text().splitlines()
    assert "-c tf2.21-cpu.txt" in lines
    pins = _pins(GPU_SET)
    assert set(pins) >= CUDA_WHEELS and all(name.startswith("nvidia-") for name in pins)
    if _installed("tensorflow").startswith("2.21."):  # The TF whose metadata says so.
        floors = {}
        for line in metadata.requires("tensorflow"):
            requirement = Requirement(line)
            if requirement.marker and "and-cuda" in str(requirement.marker):
                (floor,) = [s for s in requirement.specifier if s.operator == ">="]
                floors[canonicalize_name(requirement.name)] = Version(floor.version)
        assert pins == floors


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_install_resolves_to_the_pinned_cuda_wheels(index, tmp_path):
    """`pip install -e '.[gpu]' -c constraints/tf2.21-gpu.txt`, as README says: TF 2.21 with
    the CUDA/cuDNN wheels it was tested with, not the newest ones.

    Only the documented combination: resolving `.[gpu]` again under the TF 2.20 set cost CI
    80 s and covers an install nobody is told to run."""
    resolved = _resolve(tmp_path, ".[gpu]", "-c", str(GPU_SET.relative_to(REPO)))
    _assert_supported(resolved, "tensorflow", "2.21")
    pins = _pins(GPU_SET)
    assert {name: resolved.get(name) for name in pins} == pins


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tpu_install_resolves(index, tmp_path):
    """`pip install -r constraints/tf2.20-tpu.txt` (then `pip install --no-deps -e .`): the TPU
    build and its libtpu from PyPI alone, no `tensorflow`, the rest as tested on CPU."""
    resolved = _resolve(tmp_path, "-r", str(TPU_SET.relative_to(REPO)))
    _assert_supported(resolved, "tensorflow-tpu", "2.20")
    requirements = _requirements(TPU_SET.read_text().splitlines())
    assert requirements["libtpu"].specifier.contains(resolved["libtpu"])
    pins = _pins(CPU_SETS["2.20"])
    differ = {
        n: (resolved[n], pins[n]) for n in resolved.keys() & pins.keys() if resolved[n] != pins[n]
    }
    assert not differ, f"TPU set differs from the CPU-tested TF 2.20 set: {differ}"
    assert not CUDA_WHEELS & set(resolved)

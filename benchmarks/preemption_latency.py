"""Time from SIGTERM to a completed checkpoint (and to exit 42) for a config, plus its size.

  python benchmarks/preemption_latency.py [--config=configs/default.py] [--signals=3]

Starts `python -m trainer.main`, sends SIGTERM at a random moment after training has begun, and
measures until the newest manifest (the commit marker) appears and until the process exits.
The bound is one inner loop (`steps_per_loop` steps), an eval if one is due at that boundary,
and one save: the signal is honoured at the next loop boundary, never inside the compiled loop.
"""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/default.py", "Config file.")
_SIGNALS = flags.DEFINE_integer("signals", 3, "Interruptions to measure.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _manifests(workdir: str) -> set[str]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return set()
    return {f for f in os.listdir(directory) if f.endswith(".manifest.json")}


def _one(workdir: str, rng: random.Random) -> dict:
    command = [
        sys.executable,
        "-m",
        "trainer.main",
        f"--config={_CONFIG.value}",
        f"--workdir={workdir}",
    ]
    if _DATA_DIR.value:
        command.append(f"--config.dataset.data_dir={_DATA_DIR.value}")
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    start_size = os.path.getsize(metrics) if os.path.exists(metrics) else 0
    while not os.path.exists(metrics) or os.path.getsize(metrics) <= start_size:
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 5))
    before = _manifests(workdir)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    saved = None
    while process.poll() is None:
        if saved is None and _manifests(workdir) - before:
            saved = time.monotonic() - sent
        time.sleep(0.01)
    exited = time.monotonic() - sent
    newest = max(_manifests(workdir), key=lambda f: int(f.split("-")[1].split(".")[0]))
    prefix = os.path.join(workdir, "checkpoints", newest.removesuffix(".manifest.json"))
    size = sum(
        os.path.getsize(os.path.join(workdir, "checkpoints", f))
        for f in os.listdir(os.path.join(workdir, "checkpoints"))
        if f.startswith(os.path.basename(prefix) + ".")
    )
    return {
        "exit_code": process.returncode,
        "to_checkpoint_s": saved or exited,
        "to_exit_s": exited,
        "bytes": size,
    }


def main(argv):
    del argv
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as workdir:
        runs = [_one(workdir, rng) for _ in range(_SIGNALS.value)]
    print(
        json.dumps(
            {
                "runs": runs,
                "median_to_checkpoint_s": round(
                    statistics.median(r["to_checkpoint_s"] for r in runs), 2
                ),
                "max_to_checkpoint_s": round(max(r["to_checkpoint_s"] for r in runs), 2),
                "median_to_exit_s": round(statistics.median(r["to_exit_s"] for r in runs), 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    app.run(main)

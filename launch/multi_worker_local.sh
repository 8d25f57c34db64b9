#!/usr/bin/env bash
# Runs N MultiWorkerMirroredStrategy workers on this machine (loopback), e.g. to try multi-worker
# training or to test it on CPU:
#
#   launch/multi_worker_local.sh N [--dry-run] --config=configs/default.py --workdir=/tmp/mw
#
# Worker i is `launch/multi_worker.sh --hosts=127.0.0.1:P0,...,127.0.0.1:PN-1 --index=i
# --no-restart` on free ports Pi (so TF_CONFIG is built in one place), with all other flags
# unchanged. If a worker exits 42 (preempted, checkpoint written) the whole job is restarted on
# new ports; any other failure of any worker stops it (a crash wins over a 42 from another
# worker). --dry-run prints the N worker commands (with ports picked now) and runs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source launch/common.sh

once=0
if [[ "${1:-}" == "--once" ]]; then  # One attempt; the restart loop calls the script this way.
  once=1
  shift
fi
num_workers="${1:-}"
[[ "$num_workers" =~ ^[1-9][0-9]*$ ]] || usage_error "$0" "N (the number of workers) comes first"
shift
dry_run=0
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    *) args+=("$arg") ;;
  esac
done

if ((!once && !dry_run)); then
  exec launch/restart_on_preemption.sh launch/multi_worker_local.sh --once "$num_workers" "$@"
fi

# Free ports, picked by binding to port 0 (the sockets are closed before the workers start).
ports=$(python - "$num_workers" <<'PY'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in sockets))
PY
)

if ((dry_run)); then
  echo "# The $num_workers workers run together, restarted as a whole on exit 42 (new ports):"
  for ((i = 0; i < num_workers; i++)); do
    launch/multi_worker.sh --hosts="$ports" --index="$i" --no-restart --dry-run "${args[@]}"
  done
  exit 0
fi

pids=()
# Run by the trap below: shellcheck misses that, as the script ends with `exit`.
# shellcheck disable=SC2317,SC2329
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }  # Preempt every worker.
trap forward INT TERM

status=0
for ((i = 0; i < num_workers; i++)); do
  launch/multi_worker.sh --hosts="$ports" --index="$i" --no-restart "${args[@]}" &
  pids+=($!)  # multi_worker.sh execs the trainer: this is the trainer's pid.
done
for pid in "${pids[@]}"; do
  while true; do  # `wait` returns early when a trapped signal arrives; then wait again.
    code=0
    wait "$pid" || code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [[ "$code" -ne 0 && ("$status" -eq 0 || "$status" -eq 42) ]]; then
    status="$code"
  fi
done
exit "$status"

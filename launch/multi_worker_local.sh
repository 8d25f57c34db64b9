#!/usr/bin/env bash
# Runs N MultiWorkerMirroredStrategy workers on this machine (loopback), e.g. to try multi-worker
# training or to test it on CPU:
#
#   launch/multi_worker_local.sh 2 --config=configs/default.py --workdir=/tmp/mw
#
# Each worker gets TF_CONFIG (cluster of 127.0.0.1 ports, its own index) and
# --config.distribution.strategy=multi_worker. All other flags pass through unchanged. If a
# worker exits 42 (preempted, checkpoint written) the whole job is restarted; any other failure of
# any worker stops it (a crash wins over a 42 from another worker).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" != "--once" ]]; then
  exec launch/restart_on_preemption.sh launch/multi_worker_local.sh --once "$@"
fi
shift
num_workers="$1"
shift

ports=$(python - "$num_workers" <<'PY'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
PY
)
workers=$(printf '"127.0.0.1:%s",' $ports)
cluster="{\"worker\": [${workers%,}]}"

pids=()
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }  # Preempt every worker.
trap forward INT TERM

run_job() {
  local status=0
  pids=()
  for ((i = 0; i < num_workers; i++)); do
    TF_CONFIG="{\"cluster\": $cluster, \"task\": {\"type\": \"worker\", \"index\": $i}}" \
      python -m trainer.main "$@" --config.distribution.strategy=multi_worker &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    while true; do  # `wait` returns early when a trapped signal arrives; then wait again.
      code=0
      wait "$pid" || code=$?
      kill -0 "$pid" 2>/dev/null || break
    done
    if [[ "$code" -ne 0 && ( "$status" -eq 0 || "$status" -eq 42 ) ]]; then
      status="$code"
    fi
  done
  return "$status"
}

run_job "$@"

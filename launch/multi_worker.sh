#!/usr/bin/env bash
# Runs one worker of a multi-host MultiWorkerMirroredStrategy job: run it on every host, with the
# same --hosts everywhere and each host's own --index (its position in --hosts):
#
#   launch/multi_worker.sh --hosts=gpu1,gpu2,gpu3 --index=0 [--port=2222] [--dry-run] \
#     --config=configs/default.py --workdir=/shared/runs/exp1
#
# It sets TF_CONFIG ({"cluster": {"worker": [host:port, ...]}, "task": {"type": "worker",
# "index": I}}; worker 0 is the chief: it alone writes checkpoints, metrics and the workdir lock,
# so the workdir must be on storage every host sees) and runs python -m trainer.main with the
# other flags unchanged and --config.distribution.strategy=multi_worker, through
# launch/restart_on_preemption.sh. A preemption (SIGTERM to any worker) makes every worker
# checkpoint and exit 42 together, so every host's loop restarts its worker and the job resumes.
#
#   --hosts=H1,H2,...  every worker's host, or host:port; the same list, in the same order, on
#                      every host
#   --index=I          this host's position in --hosts (0 = the chief)
#   --port=P           the port of hosts given without one (default 2222; open it between hosts)
#   --dry-run          print the command and its environment (TF_CONFIG) and run nothing
#   --no-restart       run the trainer once, without restart_on_preemption.sh (for a caller that
#                      restarts the whole job itself, like launch/multi_worker_local.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source launch/common.sh

hosts=""
index=""
port=2222
dry_run=0
restart=1
args=()
for arg in "$@"; do
  case "$arg" in
    --hosts=*) hosts="${arg#*=}" ;;
    --index=*) index="${arg#*=}" ;;
    --port=*) port="${arg#*=}" ;;
    --dry-run) dry_run=1 ;;
    --no-restart) restart=0 ;;
    *) args+=("$arg") ;;
  esac
done

[[ -n "$hosts" ]] || usage_error "$0" "--hosts=H1,H2,... is required"
[[ "$port" =~ ^[0-9]+$ ]] || usage_error "$0" "--port ($port) must be a number"
IFS=, read -r -a host_list <<<"$hosts"
workers=()
for host in "${host_list[@]}"; do
  # Names, IPv4 or [IPv6] addresses only: they go into JSON and must not need escaping.
  if [[ ! "$host" =~ ^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]+)?$ ]]; then
    usage_error "$0" "--hosts entry '$host' is not a host, host:port or [ipv6]:port"
  fi
  [[ "$host" =~ :[0-9]+$ ]] || host="$host:$port"
  for seen in "${workers[@]}"; do
    [[ "$seen" != "$host" ]] || usage_error "$0" "--hosts lists $host twice"
  done
  workers+=("$host")
done
if [[ ! "$index" =~ ^[0-9]+$ ]] || ((index >= ${#workers[@]})); then
  usage_error "$0" "--index ('$index') must be 0..$((${#workers[@]} - 1)) for ${#workers[@]} hosts"
fi

cluster=$(printf '"%s", ' "${workers[@]}")
task="{\"type\": \"worker\", \"index\": $index}"
tf_config="{\"cluster\": {\"worker\": [${cluster%, }]}, \"task\": $task}"

trainer=(python -m trainer.main "${args[@]}" --config.distribution.strategy=multi_worker)
if ((restart)); then
  trainer=(launch/restart_on_preemption.sh "${trainer[@]}")
fi
run_or_print "$dry_run" "TF_CONFIG=$tf_config" -- "${trainer[@]}"

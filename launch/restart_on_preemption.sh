#!/usr/bin/env bash
# Runs a command; if it exits 42 (preempted after writing a checkpoint) runs it again, so the job
# resumes where it stopped. Any other exit code ends the loop with that code. A SIGTERM/SIGINT to
# this script is passed on to the command and ends the loop after it (with the command's code).
#
#   launch/restart_on_preemption.sh [--dry-run] python -m trainer.main --config=... --workdir=...
#
# --dry-run (first argument only: the rest is the command) prints the command and runs nothing.
set -uo pipefail

if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  # shellcheck source=common.sh
  source "$(dirname "$0")/common.sh"
  print_command -- "$0" "$@"
  exit 0
fi

child=0
stopping=0
forward() { stopping=1; kill -TERM "$child" 2>/dev/null; }
trap forward INT TERM

while true; do
  "$@" &
  child=$!
  while true; do  # `wait` returns early when a trapped signal arrives; then wait again.
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break
  done  # (No `set -e` here: a failing command must reach the exit below with its status.)
  [[ "$status" -eq 42 && "$stopping" -eq 0 ]] || exit "$status"
  echo "restart_on_preemption: exit 42 (preempted); resuming from the last checkpoint" >&2
done

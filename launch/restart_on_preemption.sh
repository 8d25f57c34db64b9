#!/usr/bin/env bash
# Runs a command; if it exits 42 (preempted after writing a checkpoint) runs it again, so the job
# resumes where it stopped. A SIGTERM/SIGINT to this script is passed on and ends the loop.
#
#   launch/restart_on_preemption.sh python -m trainer.main --config=... --workdir=...
set -uo pipefail

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

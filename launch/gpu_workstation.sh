#!/usr/bin/env bash
# Trains on all GPUs of this machine (MirroredStrategy, through strategy=auto; a config that sets
# strategy=tpu, like imagenet_resnet50.py, needs --config.distribution.strategy=mirrored) and
# resumes after a preemption (exit 42), e.g. on a spot VM:
#
#   launch/gpu_workstation.sh [--dry-run] --config=configs/default.py --workdir=/data/runs/exp1
#
# --dry-run prints the command and its environment and runs nothing. All other flags pass through
# to python -m trainer.main unchanged; hyperparameters belong in configs/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source launch/common.sh

dry_run=0
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    *) args+=("$arg") ;;
  esac
done

# cuda_malloc_async: less memory fragmentation. An allocator set by the caller is kept.
run_or_print "$dry_run" "TF_GPU_ALLOCATOR=${TF_GPU_ALLOCATOR:-cuda_malloc_async}" -- \
  launch/restart_on_preemption.sh python -m trainer.main "${args[@]}"

#!/usr/bin/env bash
# Trains on all GPUs of this machine (MirroredStrategy, through strategy=auto; a config that sets
# strategy=tpu, like imagenet_resnet50.py, needs --config.distribution.strategy=mirrored) and
# resumes after a preemption (exit 42), e.g. on a spot VM:
#
#   launch/gpu_workstation.sh --config=configs/default.py --workdir=/data/runs/exp1
#
# Flags pass through to python -m trainer.main; hyperparameters belong in configs/.
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_GPU_ALLOCATOR="${TF_GPU_ALLOCATOR:-cuda_malloc_async}"  # Less memory fragmentation.
exec launch/restart_on_preemption.sh python -m trainer.main "$@"

#!/usr/bin/env bash
# Runs on a Cloud TPU VM (every host of a pod slice runs this same command) and trains with
# TPUStrategy on the TPU attached to it. From your laptop, for a slice named my-tpu:
#
#   gcloud compute tpus tpu-vm ssh my-tpu --zone=ZONE --worker=all --command="\
#     cd tfscale && launch/cloud_tpu_vm.sh --config=configs/imagenet_resnet50.py \
#     --workdir=gs://BUCKET/runs/exp1 --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets"
#
# Workdir and data must be on GCS: the hosts share nothing else. A process preempted by SIGTERM
# checkpoints, exits 42 and is restarted here; after a VM preemption, rerun the gcloud command.
# Without a reachable TPU the run fails at start-up; it never falls back to the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec launch/restart_on_preemption.sh \
  python -m trainer.main "$@" --config.distribution.strategy=tpu

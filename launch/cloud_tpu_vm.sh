#!/usr/bin/env bash
# Trains on a Cloud TPU VM with TPUStrategy. Run it on your own machine (it starts the trainer on
# worker 0 through `gcloud compute tpus tpu-vm ssh`) or, with --here, on worker 0 itself:
#
#   launch/cloud_tpu_vm.sh --tpu=my-tpu --zone=us-central2-b [--project=P] [--pod] \
#     --config=configs/imagenet_resnet50.py --workdir=gs://BUCKET/runs/exp1 \
#     --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets
#
# One trainer process, on worker 0, is the only client and the only writer of the workdir:
# - single-host TPU VM (v4-8, v5litepod-8, ...): it uses the TPU attached to that VM
#   (--config.distribution.tpu=local);
# - pod slice (--pod: several hosts, e.g. v4-32; created with a TensorFlow `-pod` runtime version
#   of the client's TensorFlow version, tpu-vm-tf-X.Y.Z-pod[-pjrt], whose tpu-runtime service
#   runs the TPU worker on every host): it addresses the whole slice by its name
#   (--config.distribution.tpu=NAME) and runs with TPU_LOAD_LIBRARY=0, so this client does not
#   take worker 0's TPU from the tpu-runtime service. The input pipelines then run in every
#   host's TPU worker, not in this process, so a dataset read through tf.py_function (the
#   ArrayRecord path, trainer/sources.py) cannot run there (never tried: no TPU here).
# Nothing runs on the other workers (--worker=all would start one writer per host).
#
#   --tpu=NAME          the TPU VM's name (needed unless --here on a single host)
#   --zone=ZONE         its zone (needed unless --here); --project=P its project (else gcloud's)
#   --pod               a multi-host slice (see above)
#   --here              run here, on worker 0, instead of through gcloud ssh (e.g. in tmux: a
#                       run through ssh ends when the ssh connection does)
#   --remote-dir=DIR    the tfscale checkout on worker 0, relative to the remote home or
#                       absolute (default: tfscale)
#   --python=PATH       its Python with tfscale installed (default: python; e.g. .venv/bin/python,
#                       relative to --remote-dir)
#   --dry-run           print the command(s) and environment and run nothing
#
# Every other flag goes to python -m trainer.main unchanged, followed by
# --config.distribution.strategy=tpu and the --config.distribution.tpu above. Workdir and data
# must be on GCS (gs://). A trainer that exits 42 (SIGTERM: checkpoint written) is restarted on
# worker 0 by launch/restart_on_preemption.sh; after a VM preemption, recreate the TPU and rerun
# this command: the run resumes from its last checkpoint. Without a reachable TPU the run fails at
# start-up; it never falls back to the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=common.sh
source launch/common.sh

tpu=""
zone=""
project=""
pod=0
here=0
remote_dir=tfscale
python=python
dry_run=0
args=()
for arg in "$@"; do
  case "$arg" in
    --tpu=*) tpu="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --pod) pod=1 ;;
    --here) here=1 ;;
    --remote-dir=*) remote_dir="${arg#*=}" ;;
    --python=*) python="${arg#*=}" ;;
    --dry-run) dry_run=1 ;;
    *) args+=("$arg") ;;
  esac
done

if ((pod || !here)); then
  [[ -n "$tpu" ]] || usage_error "$0" "--tpu=NAME is required (unless --here on a single host)"
fi
if ((!here)); then
  [[ -n "$zone" ]] || usage_error "$0" "--zone=ZONE is required (unless --here)"
fi

environment=()
target=local
if ((pod)); then
  environment=(TPU_LOAD_LIBRARY=0)
  target="$tpu"
fi
trainer=(launch/restart_on_preemption.sh "$python" -m trainer.main "${args[@]}"
  --config.distribution.strategy=tpu "--config.distribution.tpu=$target")

if ((here)); then
  run_or_print "$dry_run" "${environment[@]}" -- "${trainer[@]}"
fi

# The remote command goes through worker 0's login shell: every word is quoted for it.
remote="cd $(quote_word "$remote_dir") && $(command_line "${environment[@]}" -- "${trainer[@]}")"
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
if [[ -n "$project" ]]; then
  ssh+=("--project=$project")
fi
ssh+=(--worker=0 "--command=$remote")
if ((dry_run)); then
  echo "# On worker 0 of $tpu: $remote"
fi
run_or_print "$dry_run" -- "${ssh[@]}"

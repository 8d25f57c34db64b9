"""ResNet-50 on ImageNet, the large-batch recipe of Goyal et al. 2017.

Prepare ImageNet once as ArrayRecord (read by index: exact resume, each host reads only its
replicas' examples; a TFRecord copy is refused with the command that converts it):

  python -m trainer.datasets.build --dataset=imagenet2012 --data_dir=gs://BUCKET/tfds \
    --file_format=array_record --manual_dir=DIR_WITH_THE_TARS
  launch/cloud_tpu_vm.sh --config=configs/imagenet_resnet50.py --workdir=gs://BUCKET/runs/r50 \
    --config.dataset.data_dir=gs://BUCKET/tfds
  python -m trainer.plan --config=configs/imagenet_resnet50.py --replicas=32 \
    --train_examples=1281167

Base LR 0.1 per 256 examples, scaled linearly to the real global batch (0.4 at 1024); 5 epochs of
linear warmup; x0.1 at epochs 30, 60 and 80 of 90; SGD momentum 0.9 with momentum correction;
224 px inception crops with flips for training, 0.875 center crops for eval. Durations are in
epochs, so the same file is right on 8 or 256 replicas. On GPUs add
--config.distribution.strategy=mirrored (or multi_worker).

As Goyal et al. mean it (their experimental settings; Caffe2's ResNet builder for BatchNorm):
- weight decay 1e-4 as L2, the loss term 0.5 * 1e-4 * ||w||^2 (gradient 1e-4 * w, through
  momentum), on conv and dense kernels only: no decay on biases or BatchNorm gamma/beta;
- ResNet-50 v1.5 (stride on the 3x3 conv), gamma = 0 in the last BatchNorm of every residual
  block, BatchNorm momentum 0.9 (moving = 0.9 * moving + 0.1 * batch; PyTorch's 0.1) and
  epsilon 1e-5;
- momentum correction: the velocity is rescaled by lr_t / lr_{t-1} whenever the LR changes
  (every warmup step, each x0.1), so each update uses the LR scheduled for it.
BatchNorm statistics are per replica: Goyal et al. used 32 examples per worker, i.e. 32 replicas
at this global batch. Above ~8k examples per batch switch to --config.optimizer.name=lars, with an
LR tuned for it: its LR multiplies the trust ratio, so this SGD LR does not carry over.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset.name = "imagenet2012"
    config.dataset.eval_split = "validation"
    config.dataset.image_size = 224
    config.dataset.augment = "inception_crop"
    config.dataset.center_crop_fraction = 0.875
    config.model.name = "resnet50"
    config.global_batch_size = 1024
    config.total_epochs = 90.0
    config.steps_per_loop = 500
    config.log_every_steps = 500
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 5000
    config.distribution.strategy = "tpu"
    config.deterministic = False  # Bitwise determinism costs throughput on accelerators.
    config.model.zero_init_residual = True
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    config.optimizer.momentum = 0.9
    config.optimizer.momentum_correction = True
    config.optimizer.weight_decay = 1e-4
    config.optimizer.weight_decay_mode = "l2"
    config.optimizer.weight_decay_exclude = ("bias", "gamma", "beta")
    config.lr.base = 0.1
    config.lr.reference_batch_size = 256
    config.lr.scaling = "linear"
    config.lr.warmup = "linear"
    config.lr.warmup_epochs = 5.0
    # Goyal et al.'s gradual warmup starts at the unscaled LR (0.1 = the peak x 256 / 1024) and
    # rises linearly to the peak. A fraction of the peak: set it to 256 / global_batch_size when
    # changing the global batch (e.g. 1/32 at 8k).
    config.lr.warmup_start_fraction = 0.25
    config.lr.decay = "piecewise"
    config.lr.boundaries = (30, 60, 80)
    config.lr.boundaries_unit = "epochs"
    config.lr.multipliers = (0.1, 0.01, 0.001)
    return config

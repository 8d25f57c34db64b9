"""Default config: a small CNN on the embedded shapes dataset, SGD momentum, linear LR rule.

Runs offline in about two minutes on a 2-core CPU:

  python -m trainer.main --config=configs/default.py --workdir=/tmp/tfscale

Every field the trainer reads is defined here, once, with a comment; variants import this file
and change a few fields. The config is locked: a mistyped override fails instead of being ignored.
Durations: the `*_steps` field is the default unit; when the matching `*_epochs` or `*_examples`
field is set it takes precedence, and is converted to steps once with the real global batch.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config."""
    config = ml_collections.ConfigDict()

    config.seed = 0  # Seeds weights, data order and dropout.
    # A resumed run refuses another seed, dataset or train split (they change which examples
    # come next); True accepts the change. Every other changed field is logged on resume.
    config.allow_data_change_on_resume = False
    # Op determinism (runs are always seeded) for bitwise-reproducible runs; None = on when no
    # GPU/TPU is used.
    config.deterministic = config_dict.placeholder(bool)

    # Examples per optimizer step, all replicas, workers and accumulated micro-batches together;
    # steps, epochs, examples_seen and the LR scaling all count in it.
    config.global_batch_size = 128
    # Micro-batches per optimizer step: each replica runs global_batch_size / (replicas x
    # accumulation_steps) examples per forward/backward pass and sums their gradients, which are
    # all-reduced once per step. 1 = no accumulation.
    config.accumulation_steps = 1
    config.total_steps = 600  # Optimizer steps in the whole run...
    config.total_epochs = config_dict.placeholder(float)  # ...or passes over the train split...
    config.total_examples = config_dict.placeholder(int)  # ...or examples seen.

    config.steps_per_loop = 50  # Steps inside one tf.function call (no host sync within).
    config.log_every_steps = 50  # Metrics to metrics.jsonl / TensorBoard / console.
    config.eval_every_steps = 200  # Full pass over the eval split; also at the end.
    config.checkpoint_every_steps = 200  # Also at the end and on preemption.
    config.max_checkpoints_to_keep = 3
    # A TensorBoard profile of the updates after step start up to step end, e.g. (20, 25), on the
    # chief, in tensorboard/plugins/profile (trainer/extras/profiling.py); () = off.
    config.profile_steps = ()
    config.export_at_end = True  # SavedModel + .keras of the last checkpoint in export/final.
    # An eval metric: eval_loss, or eval_ + a metric of trainer/task.py (eval_accuracy); with
    # ema_decay > 0 an ema_eval_ one. Its best is kept in export/best (extras/best.py); "" = off.
    config.best_metric = ""
    config.best_mode = "max"  # max | min: which direction of best_metric is better.
    # Fine-tuning: model weights for a fresh run from a workdir, .../ckpt-N, .keras or .weights.h5.
    config.init_checkpoint = ""
    config.init_checkpoint_include = ()  # Layer-name patterns to load (fnmatch); () = all.
    config.init_checkpoint_exclude = ()  # Layer-name patterns left fresh, e.g. ("dense_1",).
    # Exponential moving average of the trainable weights, e.g. 0.999 (trainer/extras/ema.py);
    # eval runs on both (ema_eval_* metrics too) and exports hold the average. 0 = off.
    config.ema_decay = 0.0
    # Your own actions, run by the outer loop after the built-in ones (trainer/actions.py):
    # "package.module:factory" entries, each factory called with the run, e.g.
    # ("my_project.logging:JsonLogger",); () = none.
    config.actions = ()

    # auto | float32 | mixed_bfloat16 | mixed_float16. auto: mixed_bfloat16 where the hardware
    # multiplies bfloat16 natively (TPU, NVIDIA compute capability >= 8.0, CPUs with AMX-BF16),
    # else float32. mixed_float16 (older GPUs' tensor cores) adds dynamic loss scaling.
    config.precision = "auto"
    # XLA-compile each replica's forward and backward pass (loop.py says why not the update).
    config.jit_compile = False

    config.distribution = ml_collections.ConfigDict()
    # auto | default | one_device | mirrored | multi_worker | tpu. auto = mirrored over all local
    # GPUs if any (or over cpu_replicas logical CPUs when > 1), else the default strategy.
    config.distribution.strategy = "auto"
    # Split the host CPU into N logical devices (N > 1) so mirrored runs N replicas without GPUs:
    # the stand-in strategy the tests use. 0 = leave the CPU as one device.
    config.distribution.cpu_replicas = 0
    config.distribution.tpu = ""  # TPU name or grpc address; "" = the TPU VM this runs on.
    # auto | cpu. auto: use the accelerators TensorFlow sees, and refuse to start on a host whose
    # GPU or TPU it cannot see (the wrong install; the error names the right one). cpu: train on
    # the CPU on purpose (GPUs hidden from TensorFlow).
    config.distribution.devices = "auto"
    # GPU memory per GPU: all (TF's default: taken at start-up) | growth (as needed) | a limit in
    # MiB, e.g. "20000".
    config.distribution.gpu_memory = "all"
    # multi_worker only. Seconds any one collective (all-reduce, broadcast) may wait for the
    # other workers before the run fails with a message; 0 = wait forever. Catches a worker
    # that is alive (heartbeats still flowing) but stuck. Must exceed the longest gap between
    # collectives: first-loop compile, eval, checkpoint save. TF costs one thread per collective.
    config.distribution.collective_timeout_seconds = 0.0
    # multi_worker only. Seconds without a heartbeat from a worker (frozen, host gone) before
    # TF's coordination service fails the job on every worker; 0 = TF's default (~10 s).
    config.distribution.heartbeat_timeout_seconds = 0.0
    # multi_worker only: auto | ring | nccl. How collectives run across workers; nccl for GPUs
    # (CPU tensors fall back to ring). mirrored on one host picks NCCL by itself.
    config.distribution.all_reduce = "auto"

    config.dataset = ml_collections.ConfigDict()
    # A TFDS name. tfscale_shapes (32x32, in memory) and tfscale_shapes_variable (32..96 px, read
    # by index from ArrayRecord) are embedded: generated locally, no network. Others (mnist,
    # cifar10, imagenet2012, ...) must already be prepared in data_dir; variable-size or large
    # ones as ArrayRecord (see sources.py).
    config.dataset.name = "tfscale_shapes"
    config.dataset.data_dir = config_dict.placeholder(
        str
    )  # None = TFDS's default (~/tensorflow_datasets).
    config.dataset.train_split = "train"
    config.dataset.eval_split = "test"
    # Images are fed at their native size unless image_size is set; then train examples get
    # `augment` and eval examples the central center_crop_fraction, both resized to image_size.
    # Augmentation is drawn from (seed, stream position), so resume stays exact.
    config.dataset.image_size = config_dict.placeholder(int)
    config.dataset.augment = "none"  # none | inception_crop (random-resized crop + flip)
    config.dataset.center_crop_fraction = 1.0  # ImageNet: 0.875 (resize 256, crop 224).
    # HOST:PORT of a tf.data service dispatcher whose workers run the train pipeline (started with
    # python -m trainer.data_service); eval stays local. One worker gives the local pipeline's
    # batches; more give each batch once but not in order (README, Multiple machines). "" = local.
    config.dataset.service_address = ""

    config.model = ml_collections.ConfigDict()
    config.model.name = "small_cnn"  # mlp | small_cnn | resnet_cifar | resnet50
    config.model.width = 32  # First conv stage's channels (MLP: width x 8 units; not resnet50).
    config.model.dropout_rate = 0.0  # Before the classifier; its RNG state is checkpointed.
    config.model.zero_init_residual = False  # gamma = 0 in each residual block's last BN (resnets).
    config.model.bn_momentum = 0.99  # Keras convention: moving = m * moving + (1 - m) * batch.
    config.model.bn_epsilon = 1e-3  # BatchNorm epsilon (resnets); Keras's default.

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # sgd | adam | adamw | lars (above ~8k global batch)
    config.optimizer.momentum = 0.9  # sgd and lars.
    config.optimizer.nesterov = False  # sgd only.
    config.optimizer.beta_1 = 0.9  # adam/adamw only.
    config.optimizer.beta_2 = 0.999  # adam/adamw only.
    config.optimizer.weight_decay = 0.0  # Applied as weight_decay_mode says; 0 = off.
    # l2: loss += 0.5 * wd * ||w||^2, through momentum (Goyal et al.) | decoupled: w -= lr * wd * w.
    config.optimizer.weight_decay_mode = "decoupled"
    # Regexes searched in variable paths ("conv1_bn/gamma"): no decay (nor LARS adaptation) there.
    config.optimizer.weight_decay_exclude = ("bias", "gamma", "beta")
    config.optimizer.momentum_correction = False  # sgd/lars: velocity x lr_t / lr_{t-1} (Goyal).
    config.optimizer.lars_trust_coefficient = 0.001  # lars only: eta of You et al. 2017.
    # Clip the all-reduced gradient to this global norm; 0 = no clipping.
    config.optimizer.grad_clip_norm = 0.0

    config.lr = ml_collections.ConfigDict()
    config.lr.base = 0.2  # The LR at reference_batch_size; the peak LR is scaled from it.
    config.lr.reference_batch_size = 256
    config.lr.scaling = "linear"  # linear (SGD, Goyal et al.) | sqrt (Adam-type) | none
    config.lr.warmup = "linear"  # linear | exponential | constant (start fraction, then the peak)
    config.lr.warmup_steps = 50
    config.lr.warmup_epochs = config_dict.placeholder(float)  # Overrides warmup_steps when set.
    config.lr.warmup_start_fraction = 0.0  # First warmup LR as a fraction of the peak.
    # constant | cosine | linear | polynomial | piecewise | rsqrt | exponential
    config.lr.decay = "cosine"
    config.lr.end_fraction = 0.0  # Floor of cosine/linear/polynomial/exponential, x peak.
    config.lr.power = 1.0  # polynomial only.
    config.lr.boundaries = ()  # piecewise only: where multipliers start, in boundaries_unit.
    config.lr.boundaries_unit = "steps"  # steps | epochs | examples
    config.lr.multipliers = ()  # piecewise only: LR = peak x multiplier after each boundary.
    config.lr.decay_rate = 0.5  # exponential only: LR x decay_rate every decay_steps.
    config.lr.decay_steps = 100  # exponential only.

    # Changes on top of the schedule, made between inner loops, checkpointed (lr_control.py).
    config.lr.milestones = ()  # When to act, in milestones_unit; e.g. (30, 60, 80).
    config.lr.milestones_unit = "epochs"  # steps | epochs | examples
    config.lr.milestone_action = "multiply"  # multiply: LR x value | set: LR = value, then decays
    config.lr.milestone_values = ()  # One value per milestone.
    config.lr.plateau_metric = ""  # An eval metric (e.g. eval_loss); "" = no reduce-on-plateau.
    config.lr.plateau_mode = "min"  # min | max: which direction is better.
    config.lr.plateau_factor = 0.5  # LR x factor when the metric stops improving.
    config.lr.plateau_patience = 2  # Evals without improvement before reducing.
    config.lr.plateau_cooldown = 0  # Evals to wait after a reduction.
    config.lr.plateau_min_delta = 0.0  # Smaller changes do not count as improvement.
    config.lr.plateau_min_lr = 0.0  # Never reduce below this LR.

    # What to do when the training loss is NaN or Inf: fail (stop, keep the checkpoints) or
    # recover (restore the last good checkpoint, scale the LR by nan_lr_factor, retry).
    config.nan_policy = "fail"
    config.nan_lr_factor = 0.5
    config.nan_max_recoveries = 3

    # Training health (trainer/health/; README "Training health" has the rules and sources).
    config.health = ml_collections.ConfigDict()
    # On a spike or explosion: warn (report only) | skip (drop spiking updates in-graph) |
    # rollback (restore the last checkpoint, LR x rollback_lr_factor). Every detector warns.
    config.health.action = "warn"
    config.health.window = 128  # Updates of history for the spike z-score (OLMo-core, Levanter).
    config.health.sigma = 6.0  # Spike: above mean + sigma x std of that history.
    config.health.min_history = 64  # No spike verdict before this many updates (Levanter).
    config.health.ratio = 2.0  # Explode: loss >= ratio x its recent mean (llm-foundry)...
    config.health.ratio_window = 100  # ...over this many previous updates...
    config.health.patience = 5  # ...for this many updates in a row.
    config.health.trend_window = 100  # Updates over which stall and oscillation are judged.
    config.health.stall_improvement = 0.01  # Stall: smoothed loss improved less than this...
    config.health.stall_lr_fraction = 0.1  # ...while the LR is above this fraction of its peak...
    config.health.converged_fraction = 0.1  # ...and the loss above this fraction of its start.
    config.health.oscillation_noise = 1.0  # Oscillate: detrended spread > this x the decrease...
    config.health.oscillation_level = 0.1  # ...and > this x the loss itself.
    # A flat loss with a median |update| / |weights| below update_ratio_low: the LR is too small;
    # above update_ratio_high: too large (rule of thumb ~1e-3; the default run peaks at ~0.015).
    config.health.update_ratio_low = 1e-4
    config.health.update_ratio_high = 3e-2
    config.health.lr_change = 1.5  # LR jumps of at least this factor are checked for effect...
    config.health.lr_transient = 20  # ...leaving out this many updates (momentum catches up)...
    config.health.lr_window = 10  # ...comparing this many updates before and after.
    config.health.rollback_lr_factor = 0.5  # rollback: the LR is multiplied by this...
    config.health.max_rollbacks = 3  # ...at most this many times per process, then it stops.

    # A hung train/eval loop or checkpoint save (trainer/watchdog.py): the stacks of all threads
    # go to the log when one runs longer than max(factor x its recent median, floor_seconds)
    # (factor x floor_seconds for the first, which compiles), again every repeat_seconds while
    # stuck. It only reports: the distribution.*_timeout_seconds fields end a hung run.
    config.watchdog = ml_collections.ConfigDict()
    config.watchdog.factor = 10.0  # 0 = no watchdog.
    config.watchdog.floor_seconds = 60.0  # At least 1 (it looks once a second).
    config.watchdog.repeat_seconds = 300.0

    return config

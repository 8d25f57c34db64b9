"""AdamW with the square-root scaling rule (the rule for Adam-type optimizers).

  python -m trainer.main --config=configs/adamw_sqrt.py --workdir=/tmp/tfscale_adamw

Doubling the global batch multiplies the peak LR by sqrt(2), not 2: Adam's per-parameter step is
already normalized, and linear scaling overshoots (Malladi et al. 2022, "On the SDEs and Scaling
Rules for Adaptive Gradient Algorithms").
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.optimizer.name = "adamw"
    config.optimizer.weight_decay = 0.05
    config.lr.base = 2e-3  # At reference_batch_size 256.
    config.lr.scaling = "sqrt"
    config.lr.warmup_steps = 60
    config.lr.end_fraction = 0.05  # Cosine floor.
    return config

"""Every config field validated once, by the module that owns it, from this one place.

`setup.prepare` calls `check_config` before it loads any data and `check_plan` once the plan
exists, both before anything is written to the workdir; `python -m trainer.plan` calls both too.
Each check raises a `ConfigError` whose one line names the field, its value and the fix.
"""

import ml_collections

from trainer import (
    actions,
    features,
    health,
    learning_rate,
    models,
    optimizers,
    recovery,
    sources,
    task,
    watchdog,
)
from trainer import plan as plan_lib


def check_config(config: ml_collections.ConfigDict, num_classes: int | None = None) -> None:
    """All fields that do not depend on the topology. `num_classes` (read from the dataset's
    metadata when None) fixes the task's metric names, which best_metric and lr.plateau_metric
    must be among."""
    plan_lib.check_config(config)  # First: it rejects nan/inf anywhere, which ranges miss.
    learning_rate.check_config(config.lr)
    optimizers.check_config(config.optimizer)
    models.check_config(config.model)
    recovery.check_config(config)
    health.check_config(config.health)
    watchdog.check_config(config.watchdog)
    # The extras' fields, by the extras themselves: where one is missing, only a config that
    # asks for it fails (in `features.load`, naming it).
    if ema := features.load("ema", config):
        ema.check_config(config.ema_decay)
    if init_checkpoint := features.load("init_checkpoint", config):
        init_checkpoint.check_config(config)
    if profiling := features.load("profiling", config):
        profiling.check_config(config.profile_steps)
    if num_classes is None:
        num_classes = sources.num_classes(config.dataset)
    eval_names = task.eval_metric_names(
        task.metric_names(num_classes), with_ema=config.ema_decay > 0
    )
    if lr_control := features.load("lr_control", config):
        lr_control.check_plateau_metric(config.lr, eval_names)
    if best := features.load("best", config):
        best.check_config(config, eval_names)
    for entry in config.actions:
        actions.user_action_factory(entry)


def check_plan(config: ml_collections.ConfigDict, plan: plan_lib.Plan) -> None:
    """What can only be checked against the resolved plan (a range within the run's steps)."""
    if profiling := features.load("profiling", config):
        profiling.check_config(config.profile_steps, plan.total_steps)

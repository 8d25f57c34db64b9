"""Previews a run's plan and LR curve without training, for any topology.

  python -m trainer.plan --config=configs/imagenet_resnet50.py --replicas=32 \
      --train_examples=1281167 --plot=lr.png
"""

from absl import flags

from trainer import cli, config_check
from trainer import plan as plan_lib

_REPLICAS = flags.DEFINE_integer("replicas", 1, "Replicas to plan for (all workers).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Hosts to plan for.")
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", None, "Train split size; read from the prepared dataset when unset."
)
_PLOT = flags.DEFINE_string("plot", "lr_schedule.png", "Where to write the LR plot; '' = none.")


def main(argv: list[str]) -> None:
    del argv
    config = cli.CONFIG.value
    config_check.check_config(config)
    train_examples = _TRAIN_EXAMPLES.value
    if train_examples is None:
        from trainer import sources  # TF and TFDS load only when the metadata is needed.

        train_examples = sources.num_train_examples(config.dataset)
    plan = plan_lib.make_plan(
        config,
        num_replicas=_REPLICAS.value,
        num_workers=_WORKERS.value,
        train_examples=train_examples,
    )
    config_check.check_plan(config, plan)
    print(plan_lib.describe(plan, config.lr))
    if _PLOT.value:
        plan_lib.plot(plan, config.lr, _PLOT.value)
        print(f"wrote {_PLOT.value}")


if __name__ == "__main__":
    cli.run(main, "config")

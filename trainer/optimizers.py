"""Optimizers chosen by name, always built around the run's learning-rate schedule."""

from collections.abc import Callable

import keras
import ml_collections

from trainer.errors import ConfigError


def _sgd(config: ml_collections.ConfigDict, learning_rate) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(
        learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay or None,
    )


def _adam(config: ml_collections.ConfigDict, learning_rate) -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(
        learning_rate,
        beta_1=config.beta_1,
        beta_2=config.beta_2,
        weight_decay=config.weight_decay or None,
    )


def _adamw(config: ml_collections.ConfigDict, learning_rate) -> keras.optimizers.Optimizer:
    return keras.optimizers.AdamW(
        learning_rate, beta_1=config.beta_1, beta_2=config.beta_2, weight_decay=config.weight_decay
    )


OPTIMIZERS: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}


def build_optimizer(
    config: ml_collections.ConfigDict, learning_rate, variables: list
) -> keras.optimizers.Optimizer:
    """Builds `config.name` and its slots now, under the caller's `strategy.scope()`.

    Built lazily, Keras 3 fails on the first distributed step ("You must feed a value for
    placeholder tensor"), and its slots would not exist yet for a restore to fill.
    """
    if config.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name ({config.name!r}) is not one of {', '.join(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[config.name](config, learning_rate)
    optimizer.build(variables)
    return optimizer

"""Optimizers by name, built around the run's LR schedule, with weight decay as recipes mean it.

Weight decay (`optimizer.weight_decay`, `weight_decay_mode`, `weight_decay_exclude`):
  l2: the loss gets 0.5 * wd * ||w||^2 per decayed variable, so its gradient wd * w goes through
    momentum: w -= lr * (g + wd * w) for plain SGD. This is Goyal et al. 2017's convention (per-
    example loss lambda/2 ||w||^2 + cross-entropy, lambda = 1e-4) and Model Garden's
    (`regularizers.l2(l2_weight_decay / 2.0)`, "to match tf.nn.l2_loss"). Keras's own
    `regularizers.L2(x)` is x * ||w||^2, without the 0.5, so it is not used. Realised as a
    regularizer on the decayed variables: `model.losses` carries the term and the loop adds it
    (`tf.nn.scale_regularization_loss`, once per global batch whatever the replica count).
    For lars the decay is part of the LARS update itself, as in the paper (see `LARS`).
  decoupled: the optimizer's own Keras decay, `w -= lr * wd * w` before the update, not through
    momentum (Loshchilov & Hutter's AdamW form, with Keras's lr factor). With momentum m, l2 acts
    about 1/(1-m) times as strongly as decoupled at the same wd (10x at m = 0.9).
  Which variables: those whose path ("layer/variable", e.g. "conv1_bn/gamma") matches none of the
  `weight_decay_exclude` regexes; by default kernels only (biases, BatchNorm gamma and beta out).
  The excluded ones also skip LARS's adaptation.
"""

import math
import re
from collections.abc import Callable, Sequence

import keras
import ml_collections
import tensorflow as tf
from absl import logging

from trainer.errors import ConfigError

WEIGHT_DECAY_MODES = ("l2", "decoupled")


@keras.saving.register_keras_serializable(package="tfscale")
class L2WeightDecay(keras.regularizers.Regularizer):
    """The loss term 0.5 * weight_decay * ||w||^2: its gradient is exactly weight_decay * w."""

    def __init__(self, weight_decay: float):
        self.weight_decay = float(weight_decay)

    def __call__(self, x) -> tf.Tensor:
        # Reads the whole variable once per update (a pass over the weights, ~100 MB for
        # ResNet-50); small next to the forward/backward pass.
        return self.weight_decay * tf.nn.l2_loss(x)

    def get_config(self) -> dict:
        return {"weight_decay": self.weight_decay}


def split_by_weight_decay(variables: Sequence, exclude: Sequence[str]) -> tuple[list, list]:
    """(decayed, excluded): a variable is excluded if a regex of `exclude` is found in its path."""
    decayed, excluded = [], []
    for variable in variables:
        hit = any(re.search(pattern, variable.path) for pattern in exclude)
        (excluded if hit else decayed).append(variable)
    return decayed, excluded


@keras.saving.register_keras_serializable(package="tfscale")
class SGD(keras.optimizers.SGD):
    """Keras SGD, plus Goyal et al. 2017's momentum correction ("Momentum correction") if asked.

    Keras keeps the LR inside the velocity: v = m * v - lr * g; w += v. After the LR changes
    (warmup, a piecewise boundary, a milestone, plateau, an override, NaN recovery), the velocity
    still holds the old LR and keeps applying it for ~1/(1-m) updates (10 at m = 0.9): a x0.1 drop
    takes effect gradually, a rise overshoots later. With `momentum_correction`, the velocity is
    first rescaled by the LR ratio, the paper's corrected eq. (10):

      v = m * (lr_t / lr_{t-1}) * v - lr_t * g;   w += v

    which makes every update exactly that of the form with the LR outside the velocity (b = m * b
    + g; w -= lr_t * b, Goyal et al.'s eq. (9), PyTorch's SGD), for any LR sequence. With a
    constant LR the ratio is exactly 1 and the update is bit for bit Keras's.

    State: per variable, a scalar "LR of its last update" (0 before the first: ratio 1, the velocity
    is 0 anyway; also after an update at LR 0, when the velocity has been zeroed). Per variable,
    not one shared scalar: `update_step` runs once per variable (under MirroredStrategy once per
    device, inside `extended.update`, after the all-reduce), so a shared scalar would be rewritten
    by the first variable's update before the others read it. These scalars sit next to the
    momentum slots, are written exactly when they are (a variable without a gradient skips both)
    and are optimizer variables, so they are checkpointed with it. Keras keys optimizer variables by
    index (`optimizer/_variables/N`): switching the option on or off changes that layout, so a run
    must resume with the setting it was started with.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        momentum_correction: bool = False,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate, momentum=momentum, nesterov=nesterov, **kwargs
        )
        self.momentum_correction = momentum_correction

    def build(self, variables: list) -> None:
        if self.built:
            return
        super().build(variables)
        self.previous_learning_rates = []
        if self.momentum_correction and self.momentum != 0:
            self.previous_learning_rates = [
                self.add_variable(shape=(), name="previous_learning_rate") for _ in variables
            ]

    def update_step(self, gradient, variable, learning_rate) -> None:
        if not self.previous_learning_rates:
            super().update_step(gradient, variable, learning_rate)
            return
        learning_rate = tf.cast(learning_rate, variable.dtype)
        step = learning_rate * tf.cast(gradient, variable.dtype)
        self._apply_step(variable, learning_rate, step)

    def _apply_step(self, variable, learning_rate: tf.Tensor, step: tf.Tensor) -> None:
        """w -= step without momentum; else v = m * c * v - step, w += v (Nesterov: w += m * v -
        step), with c = lr_t / lr_{t-1} under momentum correction, else 1. `learning_rate` is the
        global LR, the one the velocity holds."""
        if not self.momentums:
            self.assign_sub(variable, step)
            return
        index = self._get_variable_index(variable)
        velocity = self.momentums[index]
        carried = tf.convert_to_tensor(velocity)
        if self.previous_learning_rates:
            previous_variable = self.previous_learning_rates[index]
            previous = tf.convert_to_tensor(previous_variable)
            ratio = tf.where(previous > 0, tf.math.divide_no_nan(learning_rate, previous), 1.0)
            carried = carried * ratio
            self.assign(previous_variable, learning_rate)
        momentum = tf.cast(self.momentum, variable.dtype)
        self.assign(velocity, carried * momentum - step)
        if self.nesterov:
            self.assign_add(variable, tf.convert_to_tensor(velocity) * momentum - step)
        else:
            self.assign_add(variable, velocity)

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum_correction": self.momentum_correction}


@keras.saving.register_keras_serializable(package="tfscale")
class LARS(SGD):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888, Alg. 1).

    When to use it: for ResNet-50 on ImageNet, SGD with the linear scaling rule and 5 epochs of
    warmup (Goyal et al.) holds accuracy up to a global batch of ~8k; above that it degrades, and
    LARS is what You et al. trained ResNet-50 with up to 32k. Below ~8k use sgd: LARS costs two
    norms per variable per update and needs its own LR tuning (its LR multiplies the trust ratio).

    Per variable w ("layer" in the paper), with gradient g, global LR lr (the schedule), trust
    coefficient eta, weight decay wd:
      local_lr = eta * ||w|| / (||g|| + wd * ||w||)    (1 when ||w|| or the denominator is 0)
      v = m * v - lr * local_lr * (g + wd * w);  w += v    (Keras's sign for v)
    The weight decay is the paper's, inside the update (L2: through momentum, scaled by local_lr),
    so lars takes `weight_decay_mode = "l2"` and no loss term is added for it. Variables excluded
    via `exclude_from_weight_decay` (call it before `build`; `build_optimizer` does, from
    `optimizer.weight_decay_exclude`: biases, BatchNorm gamma/beta) get neither decay nor
    adaptation: plain momentum SGD at lr, as in MLPerf/Model Garden practice. Model Garden's LARS
    adds wd * w to g first and uses ||g + wd * w|| as the denominator; this is the paper's form.
    Momentum correction (see `SGD`) rescales v by the global LR's ratio.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        weight_decay_rate: float = 0.0,
        momentum_correction: bool = False,
        **kwargs,
    ):
        if kwargs.get("weight_decay") is not None or kwargs.get("nesterov"):
            raise ValueError("LARS has its own weight_decay_rate and no Nesterov variant")
        kwargs.pop("weight_decay", None)
        kwargs.pop("nesterov", None)
        super().__init__(
            learning_rate=learning_rate,
            momentum=momentum,
            momentum_correction=momentum_correction,
            **kwargs,
        )
        self.trust_coefficient = float(trust_coefficient)
        self.weight_decay_rate = float(weight_decay_rate)

    def build(self, variables: list) -> None:
        if self.built:
            return
        super().build(variables)
        # Python bools, fixed at build: the update traces once, with no branch on tensors.
        self.adapted = [self._use_weight_decay(variable) for variable in variables]

    def update_step(self, gradient, variable, learning_rate) -> None:
        learning_rate = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        if not self.adapted[self._get_variable_index(variable)]:
            self._apply_step(variable, learning_rate, learning_rate * gradient)
            return
        weights = tf.convert_to_tensor(variable)
        decay = tf.cast(self.weight_decay_rate, variable.dtype)
        weight_norm = tf.norm(weights)
        denominator = tf.norm(gradient) + decay * weight_norm
        trust = tf.where(
            (weight_norm > 0) & (denominator > 0),
            tf.math.divide_no_nan(self.trust_coefficient * weight_norm, denominator),
            1.0,
        )
        step = learning_rate * trust * (gradient + decay * weights)
        self._apply_step(variable, learning_rate, step)

    def get_config(self) -> dict:
        config = super().get_config()
        del config["nesterov"]
        config.update(
            trust_coefficient=self.trust_coefficient, weight_decay_rate=self.weight_decay_rate
        )
        return config


def _decoupled_weight_decay(config: ml_collections.ConfigDict) -> float | None:
    """Keras's own (decoupled) weight decay, or None when it is l2 (a loss term) or off."""
    if config.weight_decay_mode == "decoupled" and config.weight_decay > 0:
        return config.weight_decay
    return None


def _sgd(config: ml_collections.ConfigDict, learning_rate) -> keras.optimizers.Optimizer:
    return SGD(
        learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        momentum_correction=config.momentum_correction,
        weight_decay=_decoupled_weight_decay(config),
    )


def _adam(config: ml_collections.ConfigDict, learning_rate) -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(
        learning_rate,
        beta_1=config.beta_1,
        beta_2=config.beta_2,
        weight_decay=_decoupled_weight_decay(config),
    )


def _adamw(config: ml_collections.ConfigDict, learning_rate) -> keras.optimizers.Optimizer:
    return keras.optimizers.AdamW(
        learning_rate, beta_1=config.beta_1, beta_2=config.beta_2, weight_decay=config.weight_decay
    )


def _lars(config: ml_collections.ConfigDict, learning_rate) -> keras.optimizers.Optimizer:
    return LARS(
        learning_rate,
        momentum=config.momentum,
        trust_coefficient=config.lars_trust_coefficient,
        weight_decay_rate=config.weight_decay,
        momentum_correction=config.momentum_correction,
    )


OPTIMIZERS: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "lars": _lars,
}
# Optimizers with a velocity that holds the LR (what momentum correction rescales).
MOMENTUM_OPTIMIZERS = ("sgd", "lars")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_in_range(field: str, value, bounds: str, hint: str) -> None:
    """`bounds` is "[0, 1]" or "[0, 1)": the bracket says whether 1 is allowed."""
    in_range = _is_number(value) and 0 <= value and (value <= 1 if bounds[-1] == "]" else value < 1)
    _require(in_range, f"optimizer.{field} ({value}) must be in {bounds}; {hint}")


def _check_weight_decay(config: ml_collections.ConfigDict) -> None:
    _require(
        config.weight_decay_mode in WEIGHT_DECAY_MODES,
        f"optimizer.weight_decay_mode ({config.weight_decay_mode!r}) is not one of "
        f"{', '.join(WEIGHT_DECAY_MODES)}",
    )
    exclude = config.weight_decay_exclude
    _require(
        isinstance(exclude, (tuple, list)) and all(isinstance(p, str) for p in exclude),
        f"optimizer.weight_decay_exclude ({exclude!r}) must be a tuple of regexes searched in "
        "variable paths, e.g. ('bias', 'gamma', 'beta'); () = decay every trainable variable",
    )
    for pattern in exclude:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(
                f"optimizer.weight_decay_exclude has an invalid regex {pattern!r} ({error})"
            ) from None
    if config.weight_decay == 0:
        return
    _require(
        not (config.name == "adamw" and config.weight_decay_mode == "l2"),
        "optimizer.weight_decay_mode ('l2') does not go with optimizer.name ('adamw'), whose decay "
        "is decoupled by definition; use weight_decay_mode='decoupled', or name='adam' for Adam "
        "with an L2 loss term",
    )
    _require(
        not (config.name == "lars" and config.weight_decay_mode == "decoupled"),
        "optimizer.weight_decay_mode ('decoupled') does not go with optimizer.name ('lars'): LARS "
        "applies its weight decay inside its update, as L2 (You et al. 2017); use "
        "weight_decay_mode='l2'",
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validates `config.optimizer` at start-up (`config_check.check_config` calls it), before the
    workdir exists: Keras checks some of these only when the optimizer is built, without the
    field's name, so every field is checked here, whichever optimizer reads it.

    Raises:
      ConfigError: naming the field, its value and the fix.
    """
    _require(
        config.name in OPTIMIZERS,
        f"optimizer.name ({config.name!r}) is not one of {', '.join(OPTIMIZERS)}",
    )
    _check_in_range("momentum", config.momentum, "[0, 1]", "e.g. 0.9")
    for field, typical in (("beta_1", 0.9), ("beta_2", 0.999)):
        _check_in_range(field, config[field], "[0, 1)", f"e.g. {typical}")
    for field in ("weight_decay", "grad_clip_norm"):
        value = config[field]
        _require(
            _is_number(value) and value >= 0, f"optimizer.{field} ({value}) must be >= 0; 0 = off"
        )
    _check_weight_decay(config)
    if config.momentum_correction:
        _require(
            config.name in MOMENTUM_OPTIMIZERS and config.momentum > 0,
            f"optimizer.momentum_correction (True) needs a velocity that holds the LR: "
            f"optimizer.name in {', '.join(MOMENTUM_OPTIMIZERS)} with optimizer.momentum > 0 "
            f"(got {config.name!r}, momentum {config.momentum}); or set it to False",
        )
    trust = config.lars_trust_coefficient
    _require(
        _is_number(trust) and trust > 0,
        f"optimizer.lars_trust_coefficient ({trust}) must be positive; e.g. 0.001 (You et al.)",
    )
    _require(
        not (config.name == "lars" and config.nesterov),
        "optimizer.nesterov (True) is not supported by optimizer.name ('lars'); set it to False",
    )


def _set_l2_penalty(variables: Sequence, weight_decay: float | None) -> None:
    """Puts `L2WeightDecay(weight_decay)` (None: no penalty) on each variable, replacing an earlier
    one (another build on the same model), never a regularizer the model set itself."""
    for variable in variables:
        if variable.regularizer is not None and not isinstance(variable.regularizer, L2WeightDecay):
            raise ValueError(
                f"{variable.path} already has a regularizer ({variable.regularizer}); weight decay "
                "is configured in optimizer.weight_decay, not in the model"
            )
        variable.regularizer = L2WeightDecay(weight_decay) if weight_decay else None


def describe_weight_decay(config: ml_collections.ConfigDict, variables: Sequence) -> str:
    """One line: how weight decay is applied and to how many variables and weights."""
    decayed, excluded = split_by_weight_decay(variables, config.weight_decay_exclude)

    def count(group: list) -> str:
        return f"{len(group)} variables ({sum(math.prod(v.shape) for v in group):,} weights)"

    if config.weight_decay == 0:
        return "weight decay | off"
    how = {
        "l2": "loss += 0.5 * wd * ||w||^2 (through momentum)",
        "decoupled": "w -= lr * wd * w (Keras, not through momentum)",
    }[config.weight_decay_mode]
    if config.name == "lars":
        how = "inside the LARS update (g + wd * w, and in the trust ratio)"
    return (
        f"weight decay | {config.weight_decay_mode} {config.weight_decay:g}: {how} | decayed: "
        f"{count(decayed)} | excluded by {tuple(config.weight_decay_exclude)}: {count(excluded)}"
    )


def build_optimizer(
    config: ml_collections.ConfigDict, learning_rate, variables: list
) -> keras.optimizers.Optimizer:
    """Builds `config.name` and its slots now, under the caller's `strategy.scope()`.

    Built lazily, Keras 3 fails on the first distributed step ("You must feed a value for
    placeholder tensor"), and its slots would not exist yet for a restore to fill.

    In l2 mode (not lars) this also sets `regularizer` on the decayed `variables` (the model's), so
    `model.losses` carries 0.5 * wd * ||w||^2 and the training loop adds it to the loss.

    `config` is checked (`config_check.check_config` runs `check_config` once, at start-up).
    """
    optimizer = OPTIMIZERS[config.name](config, learning_rate)
    decayed, excluded = split_by_weight_decay(variables, config.weight_decay_exclude)
    # Read by Keras's decoupled decay and by LARS (decay and adaptation); must precede build.
    optimizer.exclude_from_weight_decay(var_list=excluded)
    l2_loss = config.weight_decay_mode == "l2" and config.name != "lars"
    _set_l2_penalty(excluded, None)
    _set_l2_penalty(decayed, config.weight_decay if l2_loss else None)
    optimizer.build(variables)
    logging.info("%s", describe_weight_decay(config, variables))
    return optimizer

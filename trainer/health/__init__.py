"""Training health: rules over per-update signals that say when the LR explodes, stalls, oscillates.

Every rule is a pure function from per-update vectors (loss, gradient norm, update norm, applied
LR; see `loop.SIGNALS`) to one flag per update, computed only from that update and the ones
before it, so the same functions serve the trainer's monitor (a few new updates at every loop
boundary) and `classify` (a whole run's history, e.g. for an LR sweep). Rules and defaults
(`configs/default.py`, `health.*`), with their sources:

  spike      log loss or log gradient norm > mean + sigma x std of the last `window` finite
             values, once `min_history` exist: 128 / 6 / 64 as OLMo-core's and Levanter's
             skip-step rule, on the log scale (see `spike_flags`).
  explode    a non-finite loss or gradient norm; or a loss >= `ratio` x the mean of the previous
             `ratio_window` losses for `patience` updates in a row: 2 / 100 / 5 as llm-foundry's
             KillLossSpike (outlier_multiplier, window_size, patience 4 = the 5th outlier), but
             from the `patience`-th update on rather than after a full window.
  stall      over `trend_window` updates, the smoothed loss (first vs last quarter's median) fell by
             less than `stall_improvement` while the LR stayed above `stall_lr_fraction` of its
             peak so far and the loss is still above `converged_fraction` of where it started;
             reported as "LR too small" when the median update/parameter norm ratio is also
             below `update_ratio_low` (CS231n's rule of thumb puts a healthy ratio near 1e-3).
  oscillate  over `trend_window` updates, the detrended loss spread (robust: median absolute
             deviation) exceeds `oscillation_noise`
             x the trend's decrease and `oscillation_level` x the loss itself (noise, not
             progress), with the loss above `converged_fraction` of its start; or the loss is
             not improving (as for a stall) while the median update ratio is above
             `update_ratio_high` (far above 1e-3: the LR is too large). A flat loss that is noisy
             or moved by such updates is an oscillation, not a stall.
  lr_not_applied  after the applied LR jumps by `lr_change` x or more (a milestone, plateau, an
             override, a recovery) between two flat stretches, the update norm per unit LR
             (`lr_window` updates before vs after, `lr_transient` updates left out for momentum
             to follow) moved by more than half the LR change in log scale: the update did not
             change size with the LR, so the optimizer did not apply it.
A detection is reported once per episode: flags of one kind less than `trend_window` updates
apart are one episode. A trend window that holds an explosion is judged as that, not as a stall
or an oscillation.
"""

import dataclasses
import math
from collections.abc import Callable

import ml_collections
import numpy as np

from trainer.errors import ConfigError
from trainer.loop import SIGNALS

KINDS = ("spike", "explode", "stall", "oscillate", "lr_not_applied")
ACTIONS = ("warn", "skip", "rollback")
VERDICTS = ("explodes", "oscillates", "stalls", "spikes", "healthy")


@dataclasses.dataclass(frozen=True)
class Rules:
    """The thresholds of every rule; `from_config(config.health)` (defaults live in the config)."""

    window: int
    sigma: float
    min_history: int
    ratio: float
    ratio_window: int
    patience: int
    trend_window: int
    stall_improvement: float
    stall_lr_fraction: float
    converged_fraction: float
    oscillation_noise: float
    oscillation_level: float
    update_ratio_low: float
    update_ratio_high: float
    lr_change: float
    lr_transient: int
    lr_window: int

    @classmethod
    def from_config(cls, health: ml_collections.ConfigDict) -> "Rules":
        return cls(**{field.name: health[field.name] for field in dataclasses.fields(cls)})

    @property
    def context(self) -> int:
        """How many past updates any rule looks at."""
        return max(
            self.window,
            self.ratio_window,
            self.trend_window,
            self.lr_transient + 2 * self.lr_window,
        )


def check_config(health: ml_collections.ConfigDict) -> None:
    """Validates `config.health` at start-up, naming the field and the fix."""
    if health.action not in ACTIONS:
        raise ConfigError(f"health.action ({health.action!r}) is not one of {', '.join(ACTIONS)}")
    rules = Rules.from_config(health)
    for name in ("window", "min_history", "ratio_window", "patience", "lr_window"):
        if getattr(rules, name) < 1:
            raise ConfigError(f"health.{name} ({getattr(rules, name)}) must be at least 1")
    if rules.trend_window < 8:
        raise ConfigError(f"health.trend_window ({rules.trend_window}) must be at least 8")
    if rules.min_history > rules.window:
        raise ConfigError(
            f"health.min_history ({rules.min_history}) must not exceed health.window "
            f"({rules.window}): the window never holds more"
        )
    if rules.ratio <= 1 or rules.lr_change <= 1:
        raise ConfigError(
            f"health.ratio ({rules.ratio}) and health.lr_change ({rules.lr_change}) are factors "
            "and must be above 1"
        )
    if not 0 < rules.update_ratio_low < rules.update_ratio_high:
        raise ConfigError(
            f"health.update_ratio_low ({rules.update_ratio_low}) must be positive and below "
            f"health.update_ratio_high ({rules.update_ratio_high})"
        )
    if health.rollback_lr_factor <= 0 or health.rollback_lr_factor >= 1:
        raise ConfigError(
            f"health.rollback_lr_factor ({health.rollback_lr_factor}) must be in (0, 1)"
        )


# ---------------------------------------------------------------------------------------------
# The rules: one flag per update, from that update and the ones before it.


def nonfinite_flags(loss: np.ndarray, grad_norm: np.ndarray) -> np.ndarray:
    return ~(np.isfinite(loss) & np.isfinite(grad_norm))


def _previous_mean_std(values: np.ndarray, window: int) -> tuple[np.ndarray, ...]:
    """Mean, population std and count of the (up to) `window` values before each value."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    squares = np.concatenate([[0.0], np.cumsum(values * values)])
    index = np.arange(len(values))
    start = np.maximum(index - window, 0)
    count = index - start
    safe = np.maximum(count, 1)
    mean = (sums[index] - sums[start]) / safe
    variance = np.maximum((squares[index] - squares[start]) / safe - mean * mean, 0.0)
    return mean, np.sqrt(variance), count


def _over_finite(x: np.ndarray, rule: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Applies `rule` to the finite values only (non-finite ones never enter a window)."""
    finite = np.isfinite(x)
    flags = np.zeros(len(x), bool)
    flags[finite] = rule(x[finite].astype(np.float64))
    return flags


def spike_flags(x: np.ndarray, window: int, sigma: float, min_history: int) -> np.ndarray:
    """log x > mean + sigma x std of the log of the previous `window` finite positive values,
    once `min_history` of them exist.

    OLMo-core and Levanter apply this rule to the raw values; on the log scale it is the same
    rule wherever the relative noise is small (an LLM's loss over 128 updates, where it was
    tuned), and it does not take the trend of a fast-falling loss or a growing gradient norm
    for spread. The same rule as `loop.SpikeGuard`, which skips those updates in-graph.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)

    def rule(values: np.ndarray) -> np.ndarray:
        mean, std, count = _previous_mean_std(values, window)
        return (np.arange(len(values)) >= min_history) & (
            values > mean + sigma * np.maximum(std, 1e-6)
        )

    return _over_finite(logs, rule)


def sustained_flags(x: np.ndarray, window: int, ratio: float, patience: int) -> np.ndarray:
    """x >= ratio x the mean of the previous (up to) `window` finite values, `patience` times in
    a row. llm-foundry waits for a full window; this starts once `patience` values exist, since
    an explosion in warmup, where the LR is the likeliest cause, would otherwise go unseen."""

    def rule(values: np.ndarray) -> np.ndarray:
        mean, _, count = _previous_mean_std(values, window)
        outlier = (count >= patience) & (values >= ratio * mean)
        run = np.zeros(len(values), int)
        for i, hit in enumerate(outlier):
            run[i] = run[i - 1] + 1 if hit and i else int(hit)
        return run >= patience

    return _over_finite(x, rule)


def _windows(x: np.ndarray, width: int) -> np.ndarray:
    """Row t: x[t - width + 1 : t + 1]; rows before a full window are NaN."""
    padded = np.concatenate([np.full(width - 1, np.nan), x.astype(np.float64)])
    return np.lib.stride_tricks.sliding_window_view(padded, width)


def loss_improvement(loss: np.ndarray, width: int) -> np.ndarray:
    """Relative improvement of the smoothed loss over the `width` updates ending at each one:
    (median of the first quarter - median of the last quarter) / median of the first quarter.
    Medians, so that a spike (the spike rule's business) does not read as a trend."""
    windows = _windows(loss, width)
    quarter = max(width // 4, 1)
    first = np.median(windows[:, :quarter], axis=1)
    last = np.median(windows[:, -quarter:], axis=1)
    return (first - last) / np.abs(first)


def trend_and_spread(loss: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The trend over each window of `width` updates, a line through the medians of its first
    and last quarters: how much it falls over the window (the decrease, >= 0), and the spread
    of the loss around it (1.4826 x the median absolute deviation: the std for Gaussian noise).
    Medians, so that a spike changes neither (a least-squares line tilts towards it)."""
    windows = _windows(loss, width)
    quarter = max(width // 4, 1)
    first = np.median(windows[:, :quarter], axis=1)
    last = np.median(windows[:, -quarter:], axis=1)
    slope = (last - first) / (width - quarter)  # Between the two quarters' centres.
    line = first[:, None] + slope[:, None] * (np.arange(width) - (quarter - 1) / 2)
    residual = windows - line
    deviation = np.abs(residual - np.median(residual, axis=1, keepdims=True))
    return np.maximum(-slope * (width - 1), 0.0), 1.4826 * np.median(deviation, axis=1)


def median_update_ratio(update_norm, param_norm, skipped, width: int) -> np.ndarray:
    """Median update/parameter norm ratio over the `width` updates ending at each one
    (skipped updates left out)."""
    ratio = np.where(skipped > 0, np.nan, update_norm / np.where(param_norm > 0, param_norm, 1))
    windows = _windows(ratio, width)
    enough = np.isfinite(windows).sum(axis=1) >= width // 2
    with np.errstate(all="ignore"):
        median = np.nanmedian(np.where(np.isfinite(windows), windows, np.nan), axis=1)
    return np.where(enough, median, np.nan)


def _not_converged(loss: np.ndarray, width: int, initial_loss: float, fraction: float):
    quarter = max(width // 4, 1)
    recent = _windows(loss, quarter).mean(axis=1)
    return recent >= fraction * initial_loss


def stall_flags(loss, learning_rate, update_ratio, rules: Rules, initial_loss, lr_peak):
    """(flat loss at a meaningful LR, updates far too small) per update; see the module doc.

    `lr_peak[t]` is the highest LR applied up to update t; `update_ratio` is
    `median_update_ratio` over `rules.trend_window`.
    """
    width = rules.trend_window
    # At the end of a decay to 0 neither a flat loss nor tiny updates mean anything.
    lr_high = _windows(learning_rate, width).min(axis=1) >= rules.stall_lr_fraction * lr_peak
    flat = (loss_improvement(loss, width) < rules.stall_improvement) & _not_converged(
        loss, width, initial_loss, rules.converged_fraction
    )
    return lr_high & flat, lr_high & flat & (update_ratio < rules.update_ratio_low)


def oscillation_flags(loss, update_ratio, rules: Rules, initial_loss):
    """(noise dominates the trend, updates far too large) per update; see the module doc."""
    width = rules.trend_window
    decrease, spread = trend_and_spread(loss, width)
    level = np.abs(_windows(loss, width).mean(axis=1))
    unfinished = _not_converged(loss, width, initial_loss, rules.converged_fraction)
    noisy = (
        (spread > rules.oscillation_noise * decrease)
        & (spread > rules.oscillation_level * level)
        & unfinished
    )
    flat = (loss_improvement(loss, width) < rules.stall_improvement) & unfinished
    return noisy, flat & (update_ratio > rules.update_ratio_high)


def lr_not_applied_flags(learning_rate, update_norm, skipped, rules: Rules):
    """Per update: the (LR ratio, update-per-LR ratio) of a checked LR change that ends at this
    update and was not applied; NaN where nothing is flagged. See the module doc."""
    n = len(learning_rate)
    lr_ratio = np.full(n, np.nan)
    per_lr_ratio = np.full(n, np.nan)
    w, transient = rules.lr_window, rules.lr_transient
    flat = math.sqrt(rules.lr_change)
    with np.errstate(all="ignore"):
        per_lr = np.where(skipped > 0, np.nan, update_norm / learning_rate)
        jumps = np.abs(np.log(learning_rate[1:] / learning_rate[:-1])) >= math.log(rules.lr_change)
    for change in np.flatnonzero(jumps) + 1:
        before = slice(change - w, change)
        after = slice(change + transient, change + transient + w)
        end = change + transient + w - 1
        if change - w < 0 or end >= n:
            continue
        lr_before, lr_after = learning_rate[before], learning_rate[after]
        if lr_before.max() > flat * lr_before.min() or lr_after.max() > flat * lr_after.min():
            continue  # A ramp, not a change between two settings.
        with np.errstate(all="ignore"):
            moved = np.nanmedian(per_lr[after]) / np.nanmedian(per_lr[before])
        ratio = np.median(lr_after) / np.median(lr_before)
        if math.isfinite(moved) and abs(math.log(moved)) > abs(math.log(ratio)) / 2:
            lr_ratio[end], per_lr_ratio[end] = ratio, moved
    return lr_ratio, per_lr_ratio


# ---------------------------------------------------------------------------------------------
# Events: episodes of flags, each with what was seen and what to do.


@dataclasses.dataclass(frozen=True)
class Event:
    step: int
    kind: str  # One of KINDS.
    message: str  # What was seen (numbers), where in the plan, and a suggestion.
    learning_rate: float

    def record(self) -> dict:
        """The `kind: health` record of metrics.jsonl (without the step)."""
        return {"health": self.kind, "message": self.message, "learning_rate": self.learning_rate}


def _suggestion(kind: str, phase: str, by_ratio: bool) -> str:
    """What to change, from the kind, where in the plan, and whether the update ratio said it."""
    early = phase.startswith(("warmup", "at the peak"))
    if kind in ("spike", "explode"):
        if early:
            return "lower lr.base or lengthen lr.warmup_steps"
        return "lower lr.base, or set optimizer.grad_clip_norm (health.action=skip drops spikes)"
    if kind == "stall":
        if by_ratio:
            return "the LR is too small for these weights: raise lr.base"
        return (
            "if the loss fell before, lower lr.base or decay sooner (lr.decay, lr.milestones); "
            "if it never fell, raise lr.base"
        )
    if kind == "oscillate":
        if by_ratio:
            return "the LR is too large for these weights: lower lr.base"
        return "lower lr.base; if early progress was good, add a decay (lr.decay, lr.milestones)"
    return (
        "the optimizer did not apply the LR it reports: check for a float LR or a custom "
        "optimizer that replaces the schedule"
    )


class Monitor:
    """Runs the rules on each loop's per-update vectors; returns new episodes as `Event`s.

    Keeps only the recent updates the rules look at (plus the first losses and the LR peak), so
    it costs the same at any step. Rebuilt on resume and after a rollback by `replay`ing the run's
    history up to that step, so it reports exactly what an uninterrupted run would.
    """

    def __init__(self, rules: Rules, phase: Callable[[int], str]):
        self._rules = rules
        self._phase = phase  # Optimizer step -> where it is in the plan.
        self._history = {name: np.empty(0) for name in ("step", *SIGNALS)}
        self._initial: list[float] = []  # The first finite losses: the converged reference.
        self._lr_peak = 0.0
        self._last_flag = {kind: -math.inf for kind in KINDS}
        self._exploded_at: int | None = None  # The first explosion: what a later stall follows.

    def replay(self, history: dict[str, np.ndarray]) -> None:
        """Takes in updates already reported on (a resumed run's history): no events."""
        self.observe(history)

    def observe(self, steps: dict[str, np.ndarray]) -> list[Event]:
        """Takes in new updates (`step` and the loop.SIGNALS columns); returns new episodes."""
        new = len(steps["step"])
        if not new:
            return []
        keep = self._rules.context + new
        history = {
            k: np.concatenate([self._history[k], np.asarray(steps[k], np.float64)])[-keep:]
            for k in self._history
        }
        self._history = history
        quarter = max(self._rules.trend_window // 4, 1)
        finite = [x for x in np.asarray(steps["loss"], np.float64) if math.isfinite(x)]
        self._initial += finite[: max(quarter - len(self._initial), 0)]
        lr_peak = np.maximum.accumulate(np.concatenate([[self._lr_peak], history["learning_rate"]]))
        events = self._detect(history, lr_peak[1:], first=len(history["step"]) - new)
        self._lr_peak = float(lr_peak[-1])
        return events

    def _detect(self, h: dict[str, np.ndarray], lr_peak: np.ndarray, first: int) -> list[Event]:
        rules = self._rules
        initial = float(np.mean(self._initial)) if self._initial else math.inf
        loss, grad, lr = h["loss"], h["grad_norm"], h["learning_rate"]
        ratio = median_update_ratio(
            h["update_norm"], h["param_norm"], h["skipped"], rules.trend_window
        )
        flat, small = stall_flags(loss, lr, ratio, rules, initial, lr_peak)
        noisy, large = oscillation_flags(loss, ratio, rules, initial)
        flat &= ~(noisy | large)  # Flat with noise or huge updates: an oscillation, not a stall.
        # Nor is a window with an explosion in it a stall or an oscillation: it exploded.
        nonfinite = nonfinite_flags(loss, grad)
        sustained = sustained_flags(loss, rules.ratio_window, rules.ratio, rules.patience)
        exploded = _windows((nonfinite | sustained).astype(float), rules.trend_window).max(axis=1)
        calm = ~(exploded > 0)
        flat, small, noisy, large = flat & calm, small & calm, noisy & calm, large & calm
        # As in loop.SpikeGuard: an update enters the spike windows only if both are usable.
        usable = np.isfinite(loss) & np.isfinite(grad) & (loss > 0) & (grad > 0)
        loss_spike, grad_spike = (
            spike_flags(np.where(usable, x, np.nan), rules.window, rules.sigma, rules.min_history)
            for x in (loss, grad)
        )
        lr_ratio, moved = lr_not_applied_flags(lr, h["update_norm"], h["skipped"], rules)
        improvement = loss_improvement(loss, rules.trend_window)
        decrease, spread = trend_and_spread(loss, rules.trend_window)
        events = []
        for i in range(first, len(loss)):
            step, at = int(h["step"][i]), f"at lr={lr[i]:.4g}"
            skipped = " (update skipped)" if h["skipped"][i] else ""
            seen = []
            if nonfinite[i]:
                seen.append(
                    ("explode", f"loss {loss[i]:.4g}, gradient norm {grad[i]:.4g}{skipped}")
                )
            elif sustained[i]:
                window = loss[max(i - 40, 0) : i]
                rise = loss[i] / np.nanmin(window) if len(window) else math.nan
                seen.append(
                    (
                        "explode",
                        f"loss {loss[i]:.4g} >= {rules.ratio:g}x its mean over the previous "
                        f"{min(i, rules.ratio_window)} updates for {rules.patience} in a row "
                        f"(rose {rise:.3g}x within {len(window)} steps)",
                    )
                )
            for name, flags, x in (("loss", loss_spike, loss), ("gradient norm", grad_spike, grad)):
                if flags[i]:
                    past = x[max(i - rules.window, 0) : i]
                    past = past[np.isfinite(past)]
                    seen.append(
                        (
                            "spike",
                            f"{name} {x[i]:.4g} vs {past.mean():.4g} +- {past.std():.2g} over the "
                            f"previous {len(past)} updates (z > {rules.sigma:g}){skipped}",
                        )
                    )
            trend = f"over {rules.trend_window} updates (loss {loss[i]:.4g})"
            updates = f"median update/parameter norm ratio {ratio[i]:.2g} (healthy ~1e-3)"
            if flat[i]:
                what = f"smoothed loss improved {100 * improvement[i]:.2g}% {trend}"
                seen.append(("stall", f"{what}; {updates}" if small[i] else what))
            if large[i]:
                seen.append(("oscillate", f"{updates} while the loss did not improve {trend}"))
            elif noisy[i]:
                what = f"loss spread {spread[i]:.3g} around its trend vs a decrease of"
                seen.append(("oscillate", f"{what} {decrease[i]:.3g} {trend}"))
            if math.isfinite(lr_ratio[i]):
                seen.append(
                    (
                        "lr_not_applied",
                        f"the LR changed {lr_ratio[i]:.3g}x but the update per unit LR changed "
                        f"{moved[i]:.3g}x (the update size did not follow the LR)",
                    )
                )
            for kind, what in seen:
                if step - self._last_flag[kind] >= rules.trend_window:
                    phase = self._phase(step)
                    suggestion = _suggestion(kind, phase, "median update" in what)
                    if kind == "stall" and self._exploded_at is not None:
                        suggestion = (
                            f"it has not recovered from the explosion at update "
                            f"{self._exploded_at}: lower lr.base"
                        )
                    events.append(
                        Event(step, kind, f"{what} {at}, {phase}: {suggestion}", float(lr[i]))
                    )
                self._last_flag[kind] = step
                if kind == "explode" and self._exploded_at is None:
                    self._exploded_at = step
        return events


def detect(
    history: dict[str, np.ndarray], rules: Rules, phase: Callable[[int], str]
) -> list[Event]:
    """Every episode in a whole run's per-update history (`metrics.read_steps`)."""
    return Monitor(rules, phase).observe(history)


def classify(events: list[Event]) -> str:
    """A run's verdict from its events: explodes (a non-finite or exploding loss) > oscillates >
    stalls > spikes (isolated spikes only, which the run survived: e.g. the gradient norm's jump
    when a network leaves its initial plateau) > healthy. An LR that was not applied is
    reported but is no verdict on the LR's value."""
    kinds = {event.kind for event in events}
    if "explode" in kinds:
        return "explodes"
    if "oscillate" in kinds:
        return "oscillates"
    if "stall" in kinds:
        return "stalls"
    if "spike" in kinds:
        return "spikes"
    return "healthy"

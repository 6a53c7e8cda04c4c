"""The loss-spike guard: skip an optimizer update whose loss or gradient norm is an outlier.

A bad batch (a stretch of garbage tokens, a corrupt document) gives one step a loss far above the
run's recent ones; applied, that update pushes the weights towards garbage. The guard keeps the
last `window` accepted values of the step's mean loss over all ranks and of the global gradient
norm before clipping and, once it holds `warmup` of them, refuses a step whose value is more than
its series' threshold of standard deviations above their mean, or that is not finite. The trainer
then skips that update (the weights and the optimizer state stay as they were) and goes on with the
next batch. The gradient norm's threshold is off by default: on clean data, tiny runs showed jumps
of the norm to 18-29 standard deviations (26-65x its mean) on ordinary text, optimizer hiccups that
gradient clipping already contains, while a batch of random tokens moved the norm less than 2x and
the loss by 9.3 standard deviations (BENCHMARKS.md, "Spike guard"). Every rank sees the same
all-reduced numbers, so every rank takes the same decision. Only accepted values enter the window:
a spike does not widen the band that judges the next step. `MAX_CONSECUTIVE_SKIPS` refusals in a row
mean the run itself is off (not one batch), and stop it. A non-finite value is refused too, and the
trainer then stops at that step (diverging weights, far more often than one bad batch; without the
guard, at its next sync).

The state is a few hundred floats, saved in every checkpoint, so a resumed run decides as the
uninterrupted one would. No torch here: the inputs are host floats.

    uv run python -c "from spike_guard import SpikeGuard; g = SpikeGuard(4, window=8, warmup=4); \\
        print([g.check(loss=v, grad_norm=1.0) for v in (3.1, 3.0, 3.2, 3.1, 3.05, 9.0)])"
"""

from __future__ import annotations

import math
from collections import deque

# A run whose updates are refused this many times in a row is diverging (or its data is garbage
# throughout): stopping with the last good checkpoint intact beats skipping forever.
MAX_CONSECUTIVE_SKIPS = 8
SERIES = ("loss", "grad_norm")


class TooManySkips(Exception):
    def __init__(self, message: str, nonfinite: bool):
        super().__init__(message)
        self.nonfinite = nonfinite  # the last refusal was a NaN / inf, not an outlier


class SpikeGuard:
    def __init__(self, threshold: float, norm_threshold: float = 0.0, window: int = 100, warmup: int = 50):
        # threshold / norm_threshold: standard deviations above the mean of the loss / the grad norm
        # (0 = that series never refuses; both 0 = the guard is off); window: accepted steps
        # remembered; warmup: accepted steps before the guard may refuse one.
        self.thresholds = {"loss": threshold, "grad_norm": norm_threshold}
        self.window, self.warmup = window, warmup
        self.history = {name: deque(maxlen=window) for name in SERIES}
        self.consecutive_skips = 0
        self.skipped = 0  # updates refused in this run (informational)

    @property
    def enabled(self) -> bool:
        return any(t > 0 for t in self.thresholds.values())

    def stats(self, name: str) -> tuple[float, float]:
        """(mean, standard deviation) of the accepted values of `name` in the window."""
        values = self.history[name]
        mean = math.fsum(values) / len(values)
        return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))

    def outlier(self, name: str, value: float) -> str | None:
        """Why `value` of series `name` is refused, or None."""
        threshold = self.thresholds[name]
        if not math.isfinite(value):
            return f"{name} is {value}"
        if not threshold or len(self.history[name]) < self.warmup:
            return None
        mean, std = self.stats(name)
        # A floor on the spread: a window of near-identical values must not turn noise into "sigmas".
        std = max(std, 1e-3 * abs(mean), 1e-8)
        score = (value - mean) / std
        if score > threshold:
            flag = "--spike-guard" if name == "loss" else "--spike-guard-norm"
            return (
                f"{name} {value:.4g} is {score:.1f} standard deviations above the mean {mean:.4g} of the last "
                f"{len(self.history[name])} steps ({flag} {threshold:g})"
            )
        return None

    def check(self, loss: float, grad_norm: float) -> str | None:
        """The reason to skip this step's update, or None (then both values join the window)."""
        if not self.enabled:
            return None
        values = {"loss": loss, "grad_norm": grad_norm}
        reasons = [r for r in (self.outlier(name, v) for name, v in values.items()) if r]
        if reasons:
            self.consecutive_skips += 1
            self.skipped += 1
            if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise TooManySkips(
                    f"{self.consecutive_skips} updates in a row were refused (last: {reasons[0]}): "
                    "the run, not one batch, is off",
                    nonfinite=not all(map(math.isfinite, values.values())),
                )
            return "; ".join(reasons)
        self.consecutive_skips = 0
        for name, v in values.items():
            self.history[name].append(v)
        return None

    def state_dict(self) -> dict:
        return {
            "history": {name: list(h) for name, h in self.history.items()},
            "consecutive_skips": self.consecutive_skips,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in SERIES:
            self.history[name] = deque(state["history"][name], maxlen=self.window)
        self.consecutive_skips, self.skipped = state["consecutive_skips"], state["skipped"]

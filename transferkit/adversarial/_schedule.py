"""The DANN warm-up ramp of the gradient-reversal coefficient."""

from __future__ import annotations

import math
from typing import Any

from .._validation import check_positive


class WarmStartSchedule:
    r"""The DANN ramp of the reversal coefficient, reaching ``hi`` exactly at ``max_steps``.

    $$
    \lambda(p) = lo + (hi - lo) \frac{2 / (1 + e^{-\alpha p}) - 1}
                                      {2 / (1 + e^{-\alpha}) - 1},
    \qquad p = \min(\text{step} / \text{max\_steps}, 1)
    $$

    The numerator is the schedule of Ganin et al. (2016, sec. 5.2.2); dividing by its
    value at ``p = 1`` makes the coefficient equal ``hi`` at ``max_steps`` for any
    ``alpha`` (without it, ``alpha = 1`` would stop at 46% of ``hi``). Past
    ``max_steps`` it stays at ``hi``. It is computed as the equal, overflow-free
    ``tanh(alpha * p / 2) / tanh(alpha / 2)``.

    Call [`step`][] once per training iteration. [`state_dict`][] and
    [`load_state_dict`][] save and restore the step (with the hyper-parameters), so a
    resumed run continues the ramp; a [`GradientReversal`][] that uses the schedule
    stores it in its module ``state_dict`` too.

    Args:
        max_steps: number of steps of the ramp (positive integer).
        alpha: steepness (``gamma = 10`` in the DANN paper).
        lo: coefficient at step 0.
        hi: coefficient from ``max_steps`` on (``hi >= lo``).

    Raises:
        TypeError: for non-numeric arguments.
        ValueError: for non-positive ``max_steps``/``alpha`` or ``hi < lo``.

    Examples:
        >>> schedule = WarmStartSchedule(max_steps=100, alpha=10.0)
        >>> schedule.value
        0.0
        >>> for _ in range(100):
        ...     schedule.step()
        >>> schedule.value, schedule.step_count
        (1.0, 100)
    """

    def __init__(
        self, max_steps: int, alpha: float = 10.0, lo: float = 0.0, hi: float = 1.0
    ) -> None:
        self.max_steps = int(check_positive(max_steps, "max_steps", integer=True))
        self.alpha = check_positive(alpha, "alpha")
        self.lo, self.hi = self._check_bounds(lo, hi)
        self.step_count = 0

    @staticmethod
    def _check_bounds(lo: object, hi: object) -> tuple[float, float]:
        for value, name in ((lo, "lo"), (hi, "hi")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{name}: expected a finite number, got {value!r}")
        low, high = float(lo), float(hi)  # type: ignore[arg-type]
        if high < low:
            raise ValueError(f"hi: expected hi >= lo, got lo={low!r}, hi={high!r}")
        return low, high

    @property
    def progress(self) -> float:
        """Training progress ``p = min(step / max_steps, 1)``."""
        return min(self.step_count / self.max_steps, 1.0)

    @property
    def value(self) -> float:
        """The coefficient at the current step."""
        p = self.progress
        if p >= 1.0:
            return self.hi
        ramp = math.tanh(self.alpha * p / 2.0) / math.tanh(self.alpha / 2.0)
        return self.lo + (self.hi - self.lo) * ramp

    def step(self) -> None:
        """Advance the schedule by one training step."""
        self.step_count += 1

    def state_dict(self) -> dict[str, Any]:
        """The current step and hyper-parameters, for checkpoints."""
        return {
            "step": self.step_count,
            "max_steps": self.max_steps,
            "alpha": self.alpha,
            "lo": self.lo,
            "hi": self.hi,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state produced by [`state_dict`][].

        Raises:
            ValueError: if ``state`` lacks the ``"step"`` key or holds invalid values.
            TypeError: if ``state`` holds a non-integer ``max_steps`` or non-numeric
                hyper-parameters.
        """
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("state: expected a dict from WarmStartSchedule.state_dict()")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state['step']: expected a non-negative integer, got {step!r}")
        max_steps = int(
            check_positive(state.get("max_steps", self.max_steps), "max_steps", integer=True)
        )
        alpha = check_positive(state.get("alpha", self.alpha), "alpha")
        lo, hi = self._check_bounds(state.get("lo", self.lo), state.get("hi", self.hi))
        self.max_steps, self.alpha, self.lo, self.hi = max_steps, alpha, lo, hi
        self.step_count = step

    def __repr__(self) -> str:
        return (
            f"WarmStartSchedule(max_steps={self.max_steps}, alpha={self.alpha:g}, "
            f"lo={self.lo:g}, hi={self.hi:g}, step={self.step_count})"
        )

"""WarmStartSchedule: the DANN ramp of the reversal coefficient."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transferkit as tk


def reference_schedule(step: int, max_steps: int, alpha: float, lo: float, hi: float) -> float:
    """The DANN schedule written out from the paper, rescaled to reach hi at p = 1."""
    p = min(step / max_steps, 1.0)
    ramp = 2.0 / (1.0 + math.exp(-alpha * p)) - 1.0
    at_end = 2.0 / (1.0 + math.exp(-alpha)) - 1.0
    return lo + (hi - lo) * ramp / at_end


@pytest.mark.parametrize(
    ("alpha", "lo", "hi"), [(10.0, 0.0, 1.0), (1.0, 0.0, 1.0), (5.0, 0.1, 2.0)]
)
def test_warm_start_schedule_matches_paper_formula(alpha: float, lo: float, hi: float) -> None:
    max_steps = 200
    schedule = tk.WarmStartSchedule(max_steps, alpha=alpha, lo=lo, hi=hi)
    seen = {}
    for step in range(0, 2 * max_steps + 1):
        seen[step] = schedule.value
        schedule.step()
    assert seen[0] == lo
    assert seen[max_steps // 2] == pytest.approx(
        reference_schedule(max_steps // 2, max_steps, alpha, lo, hi), rel=1e-12
    )
    assert seen[37] == pytest.approx(reference_schedule(37, max_steps, alpha, lo, hi), rel=1e-12)
    assert seen[max_steps] == hi
    assert seen[max_steps + 1] == hi
    assert seen[2 * max_steps] == hi


def test_warm_start_schedule_with_alpha_one_reaches_hi_not_046() -> None:
    schedule = tk.WarmStartSchedule(10, alpha=1.0)
    for _ in range(9):
        schedule.step()
    assert schedule.value == pytest.approx(reference_schedule(9, 10, 1.0, 0.0, 1.0))
    schedule.step()
    unscaled = 2.0 / (1.0 + math.exp(-1.0)) - 1.0
    assert unscaled == pytest.approx(0.462, abs=1e-3)
    assert schedule.value == 1.0


@given(
    max_steps=st.integers(1, 500),
    alpha=st.floats(0.01, 50.0),
    lo=st.floats(-5.0, 5.0),
    width=st.floats(0.0, 10.0),
)
def test_warm_start_schedule_is_monotone_and_within_bounds(
    max_steps: int, alpha: float, lo: float, width: float
) -> None:
    hi = lo + width
    schedule = tk.WarmStartSchedule(max_steps, alpha=alpha, lo=lo, hi=hi)
    values = []
    for _ in range(max_steps + 3):
        values.append(schedule.value)
        schedule.step()
    assert all(lo <= v <= hi for v in values)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[0] == lo
    assert values[max_steps] == hi


def test_warm_start_schedule_state_dict_resumes_the_ramp() -> None:
    schedule = tk.WarmStartSchedule(100, alpha=10.0, lo=0.0, hi=0.5)
    for _ in range(37):
        schedule.step()
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    resumed = tk.WarmStartSchedule(100)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step_count == 37
    assert resumed.value == schedule.value
    resumed.step()
    schedule.step()
    assert resumed.value == schedule.value


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_steps": 0}, ValueError),
        ({"max_steps": 2.5}, TypeError),
        ({"max_steps": 10, "alpha": 0.0}, ValueError),
        ({"max_steps": 10, "lo": 1.0, "hi": 0.5}, ValueError),
        ({"max_steps": 10, "hi": float("inf")}, ValueError),
    ],
)
def test_warm_start_schedule_rejects_bad_arguments(kwargs, error) -> None:
    with pytest.raises(error):
        tk.WarmStartSchedule(**kwargs)


@pytest.mark.parametrize(
    ("state", "error"),
    [
        ({"step": 3, "max_steps": 2.5}, TypeError),
        ({"step": 3, "max_steps": True}, TypeError),
        ({"step": 3, "max_steps": 0}, ValueError),
        ({"step": 3, "lo": "0"}, TypeError),
    ],
)
def test_warm_start_schedule_load_state_dict_checks_like_the_constructor(
    state: dict[str, object], error: type[Exception]
) -> None:
    # max_steps=2.5 used to be truncated to 2 without a word: the ramp then ended a
    # step early, where the constructor refuses 2.5 with a TypeError.
    schedule = tk.WarmStartSchedule(10)
    with pytest.raises(error, match="max_steps|lo"):
        schedule.load_state_dict(state)
    assert schedule.step_count == 0 and schedule.max_steps == 10

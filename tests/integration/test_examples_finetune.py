"""Smoke run of examples/finetune_digits.py: the script asserts that transfer beats scratch."""

from __future__ import annotations

import pytest

from ._examples import run_example


@pytest.mark.slow
def test_finetune_digits_smoke_transfer_beats_scratch() -> None:
    result = run_example("examples/finetune_digits.py", "--smoke")
    methods = ("scratch", "linear probe", "fine-tune", "LP-FT", "gradual unfreezing", "L2-SP")
    for method in (*methods, "one-cycle GU"):
        assert f"\n{method} " in result.stdout, method
    assert "5 labels/class" in result.stdout and "10 labels/class" in result.stdout

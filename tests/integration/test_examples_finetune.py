"""Smoke run of examples/finetune_digits.py: the script asserts that transfer beats scratch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_finetune_digits_smoke_transfer_beats_scratch() -> None:
    result = subprocess.run(
        [sys.executable, "examples/finetune_digits.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    methods = ("scratch", "linear probe", "fine-tune", "LP-FT", "gradual unfreezing", "L2-SP")
    for method in (*methods, "one-cycle GU"):
        assert f"\n{method} " in result.stdout, method
    assert "5 labels/class" in result.stdout and "10 labels/class" in result.stdout

"""Smoke run of examples/deep_features_svm.py (it asserts its own headline result)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_deep_features_svm_example_smoke_run_succeeds():
    result = subprocess.run(
        [sys.executable, "examples/deep_features_svm.py", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "+ CORAL" in result.stdout

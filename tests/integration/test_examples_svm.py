"""Smoke run of examples/deep_features_svm.py (it asserts its own headline result)."""

from __future__ import annotations

import pytest

from ._examples import run_example


@pytest.mark.slow
def test_deep_features_svm_example_smoke_run_succeeds():
    result = run_example("examples/deep_features_svm.py", "--smoke")
    assert "+ CORAL" in result.stdout

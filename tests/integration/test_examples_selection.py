"""Smoke runs of the selection and meta-learning examples (each asserts its headline)."""

from __future__ import annotations

import subprocess

import pytest

from ._examples import run_example


def run_smoke(script: str) -> subprocess.CompletedProcess[str]:
    # One intra-op thread: the smoke results do not depend on the machine's core count,
    # and small models do not slow down from thread contention on a busy machine.
    return run_example(f"examples/{script}", "--smoke", env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_choose_model_scores_rank_with_fine_tuned_accuracy() -> None:
    result = run_smoke("choose_model.py")
    assert "Kendall tau" in result.stdout and "LogME picks" in result.stdout


@pytest.mark.slow
def test_select_without_labels_compares_validators_with_the_oracle() -> None:
    result = run_smoke("select_without_labels.py")
    for validator in ("IWCV", "DEV", "SND", "entropy", "oracle"):
        assert validator in result.stdout


@pytest.mark.slow
def test_meta_digits_meta_learned_heads_beat_random_init() -> None:
    result = run_smoke("meta_digits.py")
    assert "Reptile" in result.stdout and "FOMAML" in result.stdout

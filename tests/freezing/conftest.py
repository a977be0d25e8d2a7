"""Fixtures of the freezing tests."""

from __future__ import annotations

import pytest
import torch

import transferkit as tk


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Tiny models: one thread avoids OpenMP spin-waiting on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def task() -> tk.datasets.DomainTask:
    return tk.datasets.digits(tk.datasets.rotate(30), seed=0)

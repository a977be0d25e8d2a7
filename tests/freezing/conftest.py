"""Fixtures of the freezing tests."""

from __future__ import annotations

import pytest

import transferkit as tk


@pytest.fixture(scope="module")
def task() -> tk.datasets.DomainTask:
    return tk.datasets.digits(tk.datasets.rotate(30), seed=0)

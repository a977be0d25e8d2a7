"""Fixtures of the meta-learning tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: with several intra-op threads on a busy machine, thread
    synchronisation dominates (100x slower); one thread keeps the module fast anywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

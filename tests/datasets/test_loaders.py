"""In-memory loaders: seeded batches and an endless stream."""

from __future__ import annotations

import pytest
import torch

from transferkit import datasets as D


def test_make_loader_is_seeded_and_infinite_cycles() -> None:
    task = D.moons(n_samples=100)
    first = [b[1].tolist() for b in D.make_loader(task.source_x, task.source_y, seed=5)]
    second = [b[1].tolist() for b in D.make_loader(task.source_x, task.source_y, seed=5)]
    assert first == second
    stream = D.infinite(D.make_loader(task.source_x, batch_size=32))
    sizes = [next(stream)[0].shape[0] for _ in range(6)]
    assert sizes[:3] == [32, 32, 6] and sizes[3:] == [32, 32, 6]


def test_make_loader_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="y: expected 4 labels"):
        D.make_loader(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))

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


def test_make_loader_order_depends_on_its_seed_only_and_each_pass_reshuffles() -> None:
    # the global generator must not leak into the order (a loader built without its own
    # generator would follow torch.manual_seed), and infinite() starts new shuffled passes
    x = torch.arange(40.0)[:, None]

    def passes(seed: int, global_seed: int) -> list[list[int]]:
        torch.manual_seed(global_seed)
        stream = D.infinite(D.make_loader(x, batch_size=40, seed=seed))
        return [next(stream)[0][:, 0].long().tolist() for _ in range(3)]

    first = passes(seed=3, global_seed=0)
    assert passes(seed=3, global_seed=99) == first
    assert passes(seed=4, global_seed=0) != first
    assert all(sorted(p) == list(range(40)) for p in first)  # every sample once per pass
    assert first[0] != first[1] != first[2]
    ordered = D.make_loader(x, batch_size=16, shuffle=False)
    assert torch.equal(torch.cat([b[0] for b in ordered]), x)

"""The torch.distributed path: each rank extracts its own contiguous shard (features/_shard.py).

A world of ranks is simulated in one process through torch.distributed's public functions
(rank, world size, ``all_gather_object``): every rank is run in turn, first to record
what it computed and gathered, then rank 0 again with every rank's part, as a real
``all_gather_object`` would give it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import transferkit as tk


class FirstColumn(nn.Module):
    """Row-wise and exact whatever the batching; records the rows and batch sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor | None = None, **inputs: Tensor) -> Tensor:
        t = x if x is not None else inputs["input_ids"]
        self.seen.append(t[:, 0].clone())
        return t[:, :1].to(torch.float32)


class _Gathered(Exception):
    """Stops a rank at the gather once its part is recorded."""


def extract_on_every_rank(
    monkeypatch: pytest.MonkeyPatch, data: Any, world: int
) -> tuple[Any, list[list[Tensor]]]:
    """Rank 0's result, and the batches of rows each rank ran its model on."""
    parts: dict[int, Any] = {}
    seen: list[list[Tensor]] = []
    current = {"rank": 0}

    def record(output: list[Any], obj: Any) -> None:
        parts[current["rank"]] = obj
        raise _Gathered

    def gather(output: list[Any], obj: Any) -> None:
        assert (parts[current["rank"]] is None) == (obj is None)
        output[:] = [parts[r] for r in range(world)]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: current["rank"])
    monkeypatch.setattr(dist, "all_gather_object", record)
    for rank in range(world):
        current["rank"] = rank
        net = FirstColumn()
        if world == 1:  # one process: nothing to shard, nothing gathered
            result = tk.extract_features(net, data, batch_size=5, progress=False)
            parts[0] = None
        else:
            with pytest.raises(_Gathered):
                tk.extract_features(net, data, batch_size=5, progress=False)
        seen.append(net.seen)
    current["rank"] = 0
    monkeypatch.setattr(dist, "all_gather_object", gather)
    if world > 1:
        result = tk.extract_features(FirstColumn(), data, batch_size=5, progress=False)
    monkeypatch.undo()
    return result, seen


@given(length=st.integers(1, 40), world=st.integers(1, 6), batch=st.integers(1, 7))
@settings(max_examples=30, deadline=None)
def test_shards_of_every_input_kind_concatenate_back_in_order(
    length: int, world: int, batch: int
) -> None:
    x = torch.arange(length * 2, dtype=torch.float32).reshape(length, 2)
    y = torch.arange(length)
    kinds: dict[str, object] = {
        "tensor": x,
        "array": x.numpy(),
        "dict": {"input_ids": x, "mask": y},
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=batch),
    }
    with pytest.MonkeyPatch.context() as monkeypatch:
        for kind, data in kinds.items():
            single = tk.extract_features(FirstColumn(), data, batch_size=5, progress=False)
            result, seen = extract_on_every_rank(monkeypatch, data, world)
            for rank, batches in enumerate(seen):  # each rank ran exactly its own block
                block = tk.distributed.shard_indices(length, rank, world)
                rows = torch.cat(batches) if batches else x[:0, 0]
                assert torch.equal(rows, x[block.start : block.stop, 0]), (kind, rank)
                if kind == "loader":  # the loader is rebuilt over the block, same batch size
                    assert all(len(b) == batch for b in batches[:-1]), (kind, rank)
                    assert not batches or 0 < len(batches[-1]) <= batch
            if isinstance(single, tuple):  # (features, labels) for the Dataset kinds
                np.testing.assert_array_equal(result[0], single[0])
                np.testing.assert_array_equal(result[1], single[1])
            else:
                np.testing.assert_array_equal(result, single)
            np.testing.assert_array_equal(
                result[0] if isinstance(result, tuple) else result, x[:, :1].numpy()
            )

"""Splitting ``extract_features`` input over ranks and merging the results (private)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset

from .distributed import shard_indices


def _shard(data: Any, rank: int, world: int) -> tuple[Any, int]:
    """This rank's contiguous block of ``data`` (same kind of container) and its length."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, Tensor):
        if data.dim() == 0:
            raise ValueError("data: expected a tensor with a sample dimension, got a scalar")
        block = shard_indices(int(data.shape[0]), rank, world)
        return data[block.start : block.stop], len(block)
    if isinstance(data, Mapping):
        values = list(data.values())
        if not values or not all(isinstance(v, Tensor) and v.dim() for v in values):
            raise TypeError("data: a mapping must hold tensors, e.g. input_ids, attention_mask")
        block = shard_indices(int(values[0].shape[0]), rank, world)
        return {k: v[block.start : block.stop] for k, v in data.items()}, len(block)
    if isinstance(data, DataLoader):
        loader = data
        if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
            raise ValueError(
                "data: under torch.distributed only a DataLoader over a map-style Dataset with "
                "a batch_size can be sharded; pass the Dataset, or distributed=False"
            )
        if not isinstance(loader.sampler, SequentialSampler) or loader.drop_last:
            raise ValueError(
                "data: a DataLoader that shuffles, uses a custom sampler or drops the last "
                "batch cannot be sharded in dataset order; pass shuffle=False and "
                "drop_last=False (or the Dataset itself), or distributed=False"
            )
        block = shard_indices(len(loader.dataset), rank, world)  # type: ignore[arg-type]
        return _subset_loader(loader, block), len(block)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        block = shard_indices(len(data), rank, world)  # type: ignore[arg-type]
        return Subset(data, block), len(block)
    raise TypeError(
        "data: under torch.distributed expected a Tensor, ndarray, dict of tensors, map-style "
        f"Dataset or DataLoader, got {type(data).__name__}; pass distributed=False"
    )


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-rank results (arrays, dicts of arrays, (features, labels) tuples)."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _concat([p[key] for p in parts]) for key in first}
    return np.concatenate(parts, axis=0)


def _columns(result: Any, names: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The ``(outputs, labels)`` that a cache sink stores, from a merged result."""
    features, labels = result if isinstance(result, tuple) else (result, None)
    outputs = [features[n] for n in names] if isinstance(features, dict) else [features]
    return outputs, labels


def _subset_loader(loader: DataLoader[Any], indices: Sequence[int]) -> DataLoader[Any]:
    """``loader`` rebuilt over ``indices`` of its dataset, in order, with its settings."""
    return DataLoader(
        Subset(loader.dataset, indices),
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
    )

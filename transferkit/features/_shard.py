"""The sharded path of ``extract_features`` under ``torch.distributed`` (no recursion).

Each rank runs the same plan on its contiguous shard of the data (`_shard`, built on
[`transferkit.distributed.shard_indices`][]: no padding duplicates); the per-rank rows are
gathered and merged in dataset order on every rank. With a cache, rank 0 opens it first:
a complete cache is read (and verified) by every rank, else rank 0 writes the merged rows
into it while the other ranks wait at a barrier.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, SequentialSampler, Subset

from ..distributed import get_rank, get_world_size, shard_indices
from ._cache import _CacheSink
from ._fingerprint import _batch_digest
from ._planner import _Plan
from ._run import _run
from ._sources import _rows_of, _Source, _split_batch

logger = logging.getLogger("transferkit.features")

_Rows = tuple[list[np.ndarray], np.ndarray | None]


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


def _merge(parts: list[_Rows]) -> _Rows:
    """Concatenate per-rank ``(outputs, labels)`` in rank order."""
    if len({labels is None for _, labels in parts}) > 1:
        raise ValueError("data: some batches carry labels and others do not")
    outputs = [
        np.concatenate(column, axis=0) for column in zip(*(p[0] for p in parts), strict=True)
    ]
    labels = [p[1] for p in parts if p[1] is not None]
    return outputs, (np.concatenate(labels, axis=0) if labels else None)


def _write_merged(sink: _CacheSink, source: _Source, merged: _Rows) -> None:
    """Store a merged result in chunks aligned with ``source``'s batches."""
    sink.reset()
    outputs, labels = merged
    rows = 0
    for batch in source.batches(()):
        count = _rows_of(_split_batch(batch)[0])
        stop = rows + count
        sink.write(
            rows,
            [out[rows:stop] for out in outputs],
            None if labels is None else labels[rows:stop],
            _batch_digest(batch),
        )
        rows = stop
    if rows != source.num_rows:
        raise ValueError(f"data: yielded {rows} samples, expected {source.num_rows}")
    sink.save(complete=True)


def _open_on_rank0(plan: _Plan, data: Any) -> tuple[_Source | None, _CacheSink | None, bool]:
    """Rank 0 opens the cache; every rank learns whether it is complete (or why it failed)."""
    source: _Source | None = None
    sink: _CacheSink | None = None
    complete, failure = False, None
    if get_rank() == 0:
        try:
            source = plan.source(data)
            sink = plan.open_cache(source)
            complete = sink.complete
        except Exception as exc:
            failure = exc
    flag: list[object] = [complete, None if failure is None else str(failure)]
    try:
        dist.broadcast_object_list(flag, src=0)  # every rank learns rank 0's outcome
    except BaseException:
        if sink is not None:
            sink.close()
        raise
    if failure is not None:
        raise failure
    if flag[1] is not None:
        raise ValueError(f"rank 0 failed to open the cache: {flag[1]}")
    return source, sink, bool(flag[0])


def _run_sharded(plan: _Plan, data: Any) -> _Rows:
    """Each rank extracts its shard; the merged rows are returned on every rank."""
    rank, world = get_rank(), get_world_size()
    source: _Source | None = None
    sink: _CacheSink | None = None
    try:
        if plan.cache is not None:
            source, sink, complete = _open_on_rank0(plan, data)
            if complete:  # every rank reads (and verifies) the cache, one at a time
                logger.info("cache: reusing %s on every rank", plan.cache)
                if sink is None:
                    source = plan.source(data)
                    sink = plan.open_cache(source)
                assert source is not None
                reader, sink = sink, None  # _run closes it
                return _run(plan, source, reader, progress=False)
        shard, length = _shard(data, rank, world)
        local = (
            _run(plan, plan.source(shard), None, progress=plan.progress and rank == 0)
            if length
            else None
        )
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, local)
        present = [p for p in parts if p is not None]
        if not present:
            raise ValueError("data: expected at least 1 sample, got 0")
        merged = _merge(present)
        if plan.cache is not None:  # rank 0 writes the merged result; the others wait for it
            failure = None
            if sink is not None and source is not None:
                try:
                    _write_merged(sink, source, merged)
                except Exception as exc:
                    failure = exc
                finally:
                    sink.close()
            status: list[object] = [None if failure is None else str(failure)]
            dist.broadcast_object_list(status, src=0)  # the barrier
            if failure is not None:
                raise failure
            if status[0] is not None:
                raise ValueError(f"rank 0 failed to write the cache: {status[0]}")
        return merged
    finally:
        if sink is not None:
            sink.close()

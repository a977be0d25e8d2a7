"""The data pass of AdaBN (private): batches, per-channel moments, the merge across ranks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        # channels are dim 1; every other dim is a sample of that channel
        values = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
        n = values.shape[1]
        if n == 0:
            return
        mean = values.mean(1)
        m2 = ((values - mean[:, None]) ** 2).sum(1)
        self.merge(n, mean, m2)

    def merge(self, n: int, mean: Tensor, m2: Tensor) -> None:
        """Add the moments of ``n`` more values per channel (Chan et al.'s update)."""
        if n == 0:
            return
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def merge_ranks(self, group: Any, channels: int, device: torch.device) -> None:
        """Merge the moments of every rank of ``group`` (the same result on each rank).

        One all-reduce of a ``world x (2C + 1)`` table in which each rank fills its row
        (works with gloo and NCCL), then the rows are merged in rank order.
        """
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        table = torch.zeros(world, 2 * channels + 1, dtype=torch.float64, device=device)
        if self.mean is not None and self.m2 is not None:
            table[rank, 0] = self.count
            table[rank, 1 : channels + 1] = self.mean
            table[rank, channels + 1 :] = self.m2
        dist.all_reduce(table, group=group)
        self.count, self.mean, self.m2 = 0, None, None
        for row in table:
            self.merge(int(row[0]), row[1 : channels + 1], row[channels + 1 :])


def _batches(data: Any, batch_size: int, device: torch.device) -> tuple[Iterator[Any], int | None]:
    """Input batches of ``data`` (labels dropped) and their number, when known."""
    import numpy as np

    from .features._sources import _make_source, _split_batch

    if isinstance(data, np.ndarray) and data.dtype != object:
        data = torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, Tensor):
        # equal-sized batches: no trailing batch of one sample (BatchNorm1d refuses it)
        if data.dim() == 0 or data.shape[0] < 2:
            got = 0 if data.dim() == 0 else data.shape[0]
            raise ValueError(f"target_data: expected at least 2 samples, got {got}")
        from ._validation import check_tensor

        check_tensor(data, "target_data")
        n = data.shape[0]
        chunks = list(torch.tensor_split(data, max(1, min(-(-n // batch_size), n // 2))))
        return iter(chunks), len(chunks)
    source = _make_source(data, batch_size, device)
    size = source.batch_size
    total = None
    if source.num_rows is not None and size:
        total = -(-source.num_rows // size)
    return (_split_batch(batch)[0] for batch in source.batches(())), total


def _ddp_group(ddp: nn.parallel.DistributedDataParallel | None) -> Any:
    """The process group of a DDP wrapper when the ranks must merge their statistics."""
    import torch.distributed as dist

    if ddp is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = getattr(ddp, "process_group", None)
    return group if dist.get_world_size(group) > 1 else None


def _sum_ranks(value: int, group: Any, device: torch.device) -> int:
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    return int(total.item())

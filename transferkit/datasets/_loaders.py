"""In-memory loaders: seeded batches over tensors, and an endless stream of them."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .._validation import check_bool, check_positive, check_seed, check_tensor


def make_loader(
    x: Tensor,
    y: Tensor | None = None,
    *,
    batch_size: int = 64,
    shuffle: bool = True,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader[tuple[Tensor, ...]]:
    """A seeded ``DataLoader`` over in-memory tensors.

    Batches are ``(x,)`` or ``(x, y)`` tuples. The shuffling order depends only on
    ``seed``, so two runs with the same seed see the same batches.

    Examples:
        >>> from transferkit.datasets import moons
        >>> task = moons(n_samples=50)
        >>> xb, yb = next(iter(make_loader(task.source_x, task.source_y, batch_size=8)))
        >>> xb.shape, yb.shape
        (torch.Size([8, 2]), torch.Size([8]))
    """
    check_tensor(x, "x", min_samples=1)
    tensors = [x]
    if y is not None:
        check_tensor(y, "y", ndim=1, finite=False)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels to match x, got {y.shape[0]}")
        tensors.append(y)
    check_positive(batch_size, "batch_size", integer=True)
    check_bool(shuffle, "shuffle")
    check_bool(drop_last, "drop_last")
    generator = torch.Generator().manual_seed(check_seed(seed))
    return DataLoader(
        TensorDataset(*tensors),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=generator,
    )


def infinite(loader: DataLoader[tuple[Tensor, ...]]) -> Iterator[tuple[Tensor, ...]]:
    """Iterate over ``loader`` forever, starting a new (reshuffled) pass when one ends.

    Domain-adaptation loops draw one source and one target batch per step although the
    two domains have different sizes; this keeps both streams going.

    Examples:
        >>> import torch
        >>> stream = infinite(make_loader(torch.arange(3.0)[:, None], batch_size=2))
        >>> [next(stream)[0].shape[0] for _ in range(4)]
        [2, 1, 2, 1]
    """
    if len(loader) == 0:
        raise ValueError("loader: expected a loader that yields at least one batch")
    while True:
        yield from loader

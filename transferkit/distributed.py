"""Multi-process helpers on top of ``torch.distributed`` (DDP, ``torchrun``).

Discrepancy losses (MMD, CORAL, JMMD) estimate a statistic of the *whole* batch. Under
DDP each process sees only its slice, so a per-rank MMD is a noisier estimate from
fewer samples (and the linear-time or unbiased estimators see fewer pairs). Gather the
features of every rank first:

    source_all = tk.distributed.all_gather(source_features)
    target_all = tk.distributed.all_gather(target_features)
    loss = tk.losses.mmd(source_all, target_all)

[`all_gather`][] is differentiable: its backward sums the incoming gradients over the
ranks and returns each rank the part that belongs to its own slice, so that after DDP
averages parameter gradients the result equals the single-process full-batch gradient.
Every function here is a no-op (or returns the trivial answer) when the process is not
part of an initialised process group, so the same code runs on one device.

Gather when the estimate quality matters more than the communication (small per-rank
batches, the unbiased/linear estimators); the cost is one all-gather of ``(B, D)``
features per domain and step. Losses that are means of per-sample terms (cross-entropy,
the domain-adversarial losses) need no gather: DDP's gradient averaging already gives the
global-batch gradient.

Elsewhere in the library: [`transferkit.extract_features`][] shards its input over the
ranks and returns the merged result, in dataset order, on every rank;
[`transferkit.freeze`][], [`transferkit.unfreeze`][] and
[`transferkit.GradualUnfreezing`][] accept a ``DistributedDataParallel`` wrapper built
with every parameter trainable and ``find_unused_parameters=True`` (and refuse wrappers
that would fail or let the ranks drift apart).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _surgery
from ._validation import check_positive, check_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "all_gather",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "shard_indices",
    "shutdown",
    "unwrap_model",
]


def is_distributed() -> bool:
    """``True`` when ``torch.distributed`` is available and a process group is initialised.

    Examples:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 when not distributed).

    Examples:
        >>> get_rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed).

    Examples:
        >>> get_world_size()
        1
    """
    return dist.get_world_size() if is_distributed() else 1


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's ``(N_r, ...)`` tensor; uneven ``N_r`` allowed."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        world = dist.get_world_size()
        rank = dist.get_rank()
        local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes_t = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(sizes_t, local)
        sizes = [int(s.item()) for s in sizes_t]
        largest = max(sizes)
        padded = x.new_zeros((largest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        buffers = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(buffers, padded.contiguous())
        ctx.sizes = sizes
        ctx.rank = rank
        return torch.cat([b[:n] for b, n in zip(buffers, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather(x: Tensor) -> Tensor:
    """Differentiable all-gather along the batch dimension (uneven sizes allowed).

    Each rank passes its ``(N_r, ...)`` tensor and receives the ``(sum_r N_r, ...)``
    concatenation in rank order. Gradients flow back to every rank's own slice; they are
    summed over ranks, so that DDP's gradient *averaging* gives the gradient of the
    loss computed on the full batch. Without an initialised process group the input is
    returned unchanged.

    Args:
        x: a tensor with a batch dimension first; same trailing shape and dtype on every
            rank.

    Returns:
        The concatenation of all ranks' tensors.

    Shape:
        - Input: ``(N_r, *)``; output: ``(sum_r N_r, *)``.

    Examples:
        >>> features = torch.randn(4, 8)
        >>> all_gather(features) is features  # single process: a no-op
        True
    """
    check_tensor(x, "x", finite=False)
    if x.dim() == 0:
        raise ValueError("x: expected a tensor with a batch dimension, got a scalar")
    if not is_distributed() or get_world_size() == 1:
        return x
    out: Tensor = _AllGather.apply(x)  # type: ignore[no-untyped-call]
    return out


def shard_indices(length: int, rank: int | None = None, world_size: int | None = None) -> range:
    """The contiguous block of ``range(length)`` that ``rank`` handles, without padding.

    Unlike ``DistributedSampler``, no index is repeated to even out the shards, so
    concatenating the shards in rank order gives back ``range(length)`` exactly.

    Args:
        length: number of items.
        rank: this process's rank (default: the current rank).
        world_size: number of processes (default: the current world size).

    Examples:
        >>> [list(shard_indices(5, r, 2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    check_positive(length, "length", strict=False, integer=True)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        # a bool would silently pick shard 0 or 1
        raise TypeError(f"rank: expected an integer or None, got {type(rank).__name__} {rank!r}")
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    check_positive(world_size, "world_size", integer=True)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected a value in [0, {world_size - 1}], got {rank}")
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return range(start, stop)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Parameter names of a wrapped model start with ``module.`` (or ``_orig_mod.``); the
    freezing and head helpers call this so that patterns like ``"fc*"`` mean the same
    with and without the wrapper.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    return _surgery.unwrap_model(model)


def shutdown(*, settle: float = 0.1) -> None:
    """End a distributed run: wait for every rank, then destroy the default process group.

    Call it once at the end of a ``torchrun`` script, on every rank, in place of
    ``dist.barrier(); dist.destroy_process_group()``. It works around a race in PyTorch's
    gloo backend that aborts a rank *after* its work is done, at interpreter exit, with
    ``terminate called without an active exception`` (SIGABRT, so ``torchrun`` reports a
    failure): the gradient all-reduces that DDP starts inside ``backward()`` capture a
    Python object (the autograd call's ``contextvars`` context) in their thread-local
    state; the last reference to them can be dropped by a gloo worker thread just after
    the final barrier returns, and if the main thread has meanwhile begun shutting the
    interpreter down, that worker's attempt to take the GIL to free the object ends the
    process. Destroying the process group does not stop the workers (DDP keeps a
    reference to the group), so ``shutdown`` frees what is collectable, then releases
    the GIL for ``settle`` seconds (the workers need microseconds; the margin covers a
    loaded machine) before destroying the group.

    Args:
        settle: seconds to leave the GIL to the backend's worker threads (``>= 0``).

    Raises:
        RuntimeError: if no process group is initialised.
        TypeError: if ``settle`` is not a number.
        ValueError: if ``settle`` is negative or not finite.

    Examples:
        >>> shutdown()  # outside torchrun
        Traceback (most recent call last):
        ...
        RuntimeError: shutdown: no process group is initialised (call dist.init_process_group first)
    """
    seconds = check_positive(settle, "settle", strict=False)
    if not is_distributed():
        raise RuntimeError(
            "shutdown: no process group is initialised (call dist.init_process_group first)"
        )
    dist.barrier()  # every rank has finished its work
    gc.collect()  # frees DDP reducers caught in reference cycles while the group is alive
    time.sleep(seconds)  # releases the GIL: worker threads drop their last work objects
    dist.destroy_process_group()
    logger.debug("shutdown: process group destroyed after %.3f s settle time", seconds)

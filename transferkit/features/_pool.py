"""Pooling a layer's output to ``(N, D)``: spatial maps, token sequences, padding masks."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .._validation import check_binary_mask, check_tensor

PoolName = Literal["avg", "max", "avgmax", "token"]
_POOLS: tuple[PoolName, ...] = ("avg", "max", "avgmax", "token")


def masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over the tokens of ``hidden`` that ``attention_mask`` marks as real.

    Padding tokens (mask 0) do not count, so a sentence gets the same embedding whatever
    the padded length of its batch. Rows whose mask is all zeros give zeros. Computed in
    float32 (or float64 for float64 input) even under autocast.

    Args:
        hidden: token features, e.g. a transformer's ``last_hidden_state``.
        attention_mask: 1 for real tokens, 0 for padding (int, bool or float).

    Returns:
        The pooled features.

    Shape:
        - hidden: ``(N, T, D)``; attention_mask: ``(N, T)``.
        - Output: ``(N, D)``.

    Raises:
        ValueError: if the shapes do not match.

    Examples:
        >>> hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
        >>> masked_mean(hidden, torch.tensor([[1, 1, 0]]))
        tensor([[2.]])
    """
    check_tensor(hidden, "hidden", ndim=3, finite=False)
    check_tensor(attention_mask, "attention_mask", ndim=2, finite=False)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask: expected shape {tuple(hidden.shape[:2])} to match hidden "
            f"(N, T), got {tuple(attention_mask.shape)}"
        )
    check_binary_mask(attention_mask, "attention_mask")
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    weights = attention_mask.to(device=hidden.device, dtype=dtype).unsqueeze(-1)
    total = (hidden.to(dtype) * weights).sum(dim=1)
    return total / weights.sum(dim=1).clamp_min(1.0)


def _masked_max(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    keep = attention_mask.to(device=hidden.device).bool().unsqueeze(-1)
    values = hidden.masked_fill(~keep, float("-inf")).amax(dim=1)
    return values.masked_fill(~keep.any(dim=1), 0.0)


def _pool(x: Tensor, mode: PoolName | None, mask: Tensor | None, layer: str) -> Tensor:
    """Pool ``x`` to ``(N, D)``; always returns a tensor that no later op can modify."""
    if mode is None or x.dim() <= 2:
        return x.clone()
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.dim() == 3:  # token sequence (N, T, D)
        if mode == "token":
            return x[:, 0].clone()
        use_mask = mask is not None and mask.dim() == 2 and mask.shape == x.shape[:2]
        avg = masked_mean(x, mask) if use_mask and mask is not None else x.mean(1, dtype=dtype)
        peak = _masked_max(x, mask) if use_mask and mask is not None else x.amax(1)
    else:  # feature map (N, C, H, W) or (N, C, D, H, W)
        if mode == "token":
            raise ValueError(
                f"pool: 'token' takes the first token of a (N, T, D) sequence, but layer "
                f"{layer!r} returned a {x.dim()}-D map of shape {tuple(x.shape)}; "
                "use 'avg', 'max', 'avgmax' or None"
            )
        dims = tuple(range(2, x.dim()))
        avg = x.mean(dims, dtype=dtype) if mode != "max" else x
        peak = x.amax(dims) if mode != "avg" else x
    if mode == "avg":
        return avg
    if mode == "max":
        return peak
    return torch.cat([avg, peak.to(avg.dtype)], dim=1)

"""The one pooling used by [`transferkit.ClassifierHead`][] and the feature extractors.

Rules (the same for heads and features):

* feature maps ``(N, C, *spatial)`` (``(N, C, H, W)``, ``(N, C, D, H, W)``): ``"avg"``,
  ``"max"`` or ``"avgmax"`` (both, concatenated: ``2 * C``) over the spatial dimensions;
  ``"token"`` is an error.
* token sequences ``(N, T, D)``: ``"avg"``/``"max"``/``"avgmax"`` over ``T``; with an
  attention mask ``(N, T)`` padding is ignored (a row with no real token gives zeros);
  ``"token"`` takes the first token (``[CLS]``), and with a mask it must be real (a
  left-padded row raises).
* features ``(N, D)``: one position, so avg = max = token = the features
  (``"avgmax"`` gives ``[x, x]``).
* ``None``: no pooling.
* an empty sequence (``T = 0``) or map (a spatial size 0) raises: its mean would be NaN.

Averages are accumulated and returned in float32 for half/bfloat16 input (float64 stays
float64), also under autocast; maxima and tokens keep the input dtype (they are exact).
Bottom layer: imports only ``_precision`` and ``_validation``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._precision import accumulation_dtype
from ._validation import check_binary_mask, check_tensor

__all__ = ["POOLS", "PoolName", "masked_mean", "pool"]

PoolName = Literal["avg", "max", "avgmax", "token"]
POOLS: tuple[PoolName, ...] = ("avg", "max", "avgmax", "token")


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
    _check_mask(hidden, attention_mask)
    return _masked_mean(hidden, attention_mask)


def _check_mask(hidden: Tensor, attention_mask: Tensor) -> None:
    check_tensor(attention_mask, "attention_mask", ndim=2, finite=False)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask: expected shape {tuple(hidden.shape[:2])} to match hidden "
            f"(N, T), got {tuple(attention_mask.shape)}"
        )
    check_binary_mask(attention_mask, "attention_mask")


def _masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    dtype = accumulation_dtype(hidden.dtype)
    weights = attention_mask.to(device=hidden.device, dtype=dtype).unsqueeze(-1)
    total = (hidden.to(dtype) * weights).sum(dim=1)
    return total / weights.sum(dim=1).clamp_min(1.0)


def _masked_max(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    keep = attention_mask.to(device=hidden.device).bool().unsqueeze(-1)
    values = hidden.masked_fill(~keep, float("-inf")).amax(dim=1)
    return values.masked_fill(~keep.any(dim=1), 0.0)


def pool(
    x: Tensor,
    mode: PoolName | None,
    *,
    mask: Tensor | None = None,
    name: str = "the model",
    copy: bool = False,
) -> Tensor:
    """Pool ``x`` to ``(N, D)`` (``(N, 2 * D)`` for ``"avgmax"``) by the rules above.

    Args:
        x: ``(N, D)``, ``(N, T, D)`` or ``(N, C, *spatial)``; the caller checks it.
        mode: ``"avg"``, ``"max"``, ``"avgmax"``, ``"token"`` or ``None``.
        mask: optional ``(N, T)`` attention mask for a token sequence (checked here).
        name: where ``x`` comes from, for error messages (``"layer 'fc'"``).
        copy: return a tensor that shares no memory with ``x`` (so later in-place
            operations on ``x`` cannot change it).

    Returns:
        The pooled features.

    Examples:
        >>> pool(torch.arange(8.0).view(1, 2, 2, 2), "avgmax")
        tensor([[1.5000, 5.5000, 3.0000, 7.0000]])
    """
    if mask is not None:
        if x.dim() != 3:
            raise ValueError(
                f"attention_mask: only a token sequence (N, T, D) can be masked, but {name} "
                f"has shape {tuple(x.shape)}"
            )
        _check_mask(x, mask)
    if mode is None:
        return x.clone() if copy else x
    pooled_dims = x.shape[1:2] if x.dim() == 3 else x.shape[2:]
    if x.dim() >= 3 and 0 in pooled_dims:
        # the mean of nothing is NaN (and the max an IndexError): say what is empty
        what = (
            "the token sequence (N, T, D) has T = 0"
            if x.dim() == 3
            else f"the map has an empty spatial size {tuple(pooled_dims)}"
        )
        raise ValueError(f"{name}: nothing to pool, {what} (shape {tuple(x.shape)})")
    if x.dim() <= 2:
        if mode == "avgmax":
            return torch.cat([x, x], dim=1)
        return x.clone() if copy else x
    if mode == "token":
        if x.dim() == 3:  # token sequence (N, T, D)
            if mask is not None and not bool(mask[:, 0].to(device="cpu").bool().all()):
                rows = torch.nonzero(~mask[:, 0].bool()).flatten().tolist()
                raise ValueError(
                    f"attention_mask: pool 'token' takes the first token, but it is padding "
                    f"in rows {rows[:5]} of {name} (a left-padded batch); pad on the right "
                    "or use 'avg', 'max' or 'avgmax', which ignore padding anywhere"
                )
            first = x[:, 0]
            return first.clone() if copy else first
        raise ValueError(
            f"pool: 'token' takes the first token of a (N, T, D) sequence, but {name} "
            f"returned a {x.dim()}-D map of shape {tuple(x.shape)}; use 'avg', 'max', "
            "'avgmax' or None"
        )
    dtype = accumulation_dtype(x.dtype)
    avg = peak = x
    if x.dim() == 3:  # token sequence (N, T, D)
        if mode != "max":
            avg = _masked_mean(x, mask) if mask is not None else x.mean(1, dtype=dtype)
        if mode != "avg":
            peak = _masked_max(x, mask) if mask is not None else x.amax(1)
    else:  # feature map (N, C, H, W) or (N, C, D, H, W)
        dims = tuple(range(2, x.dim()))
        if mode != "max":
            avg = x.mean(dims, dtype=dtype)
        if mode != "avg":
            peak = x.amax(dims)
    if mode == "avg":
        return avg
    if mode == "max":
        return peak
    return torch.cat([avg, peak.to(avg.dtype)], dim=1)

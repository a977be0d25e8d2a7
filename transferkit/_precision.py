"""The fp32-under-autocast rules, in one place (private; a bottom layer).

Losses, kernels and the adversarial heads compute in at least fp32: half precision
inputs (fp16/bf16, e.g. from `torch.autocast` or a half model) are upcast to fp32,
fp32/fp64 inputs keep their dtype, and the computation runs with autocast switched off
so that an fp32 matmul is not silently re-cast to half precision. Pooled features use
the same rule through ``accumulation_dtype`` (which also maps integer inputs to
fp32).

This module imports nothing from transferkit.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HALF_DTYPES",
    "accumulation_dtype",
    "as_compute",
    "compute_dtype",
    "no_autocast",
]

#: The reduced-precision floating dtypes that are computed in fp32.
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def compute_dtype(x: Tensor | torch.dtype) -> torch.dtype:
    """The dtype computations on ``x`` run in: fp32 for half precision, else its dtype.

    Args:
        x: a tensor or a dtype.

    Returns:
        ``torch.float32`` for fp16/bf16, otherwise the dtype unchanged.
    """
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float32 if dtype in HALF_DTYPES else dtype


def as_compute(x: Tensor) -> Tensor:
    """``x`` cast to ``compute_dtype`` (a no-op, the same tensor, for fp32/fp64)."""
    dtype = compute_dtype(x)
    return x if x.dtype == dtype else x.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate (sum, mean) values of ``dtype`` in: at least fp32.

    ``torch.promote_types(dtype, torch.float32)``: fp32 for half precision and integer
    inputs, fp64 for fp64.
    """
    return torch.promote_types(dtype, torch.float32)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast on ``device`` so that fp32 stays fp32.

    A no-op context for device types that have no autocast.
    """
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()

"""Shared argument checks used by every public function.

Every check raises a ``ValueError`` or ``TypeError`` whose message starts with the
argument's name, says what was expected and what was received, so that users can fix
the call without reading the source.
"""

from __future__ import annotations

import difflib
import itertools
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "check_binary_mask",
    "check_bool",
    "check_features",
    "check_finite",
    "check_in_range",
    "check_labels",
    "check_module_data",
    "check_not_meta",
    "check_option",
    "check_pair",
    "check_positive",
    "check_same_width",
    "check_seed",
    "check_tensor",
    "did_you_mean",
]

T = TypeVar("T", bound=str)


class _Shaped(Protocol):
    """An array or tensor: anything with a ``shape``."""

    @property
    def shape(self) -> tuple[int, ...]: ...


#: Unsigned integer dtypes beyond uint8, which most torch reductions do not support.
UNSIGNED_WIDE = tuple(
    getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)
)


def did_you_mean(name: str, candidates: Iterable[str], *, n: int = 3) -> str:
    """Return a ``"; did you mean 'a' or 'b'?"`` suffix, or ``""`` when nothing is close.

    Examples:
        >>> did_you_mean("layer5", ["layer1", "layer4", "fc"])
        "; did you mean 'layer4' or 'layer1'?"
    """
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"


def check_option(value: object, name: str, options: Sequence[T]) -> T:
    """Check that ``value`` is one of the string ``options`` and return it.

    Examples:
        >>> check_option("biased", "estimator", ("biased", "unbiased"))
        'biased'
    """
    if not isinstance(value, str) or value not in options:
        choices = ", ".join(repr(o) for o in options)
        hint = did_you_mean(value, options) if isinstance(value, str) else ""
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}{hint}")
    return value  # type: ignore[return-value]


def check_bool(value: object, name: str, *, optional: bool = False) -> bool:
    """Check that ``value`` is a ``bool`` (not ``1``, ``"no"`` or ``np.bool_``); return it.

    A truthy string such as ``"no"`` would silently switch a flag on, so flags accept
    ``True``/``False`` only (``None`` too when ``optional``).

    Examples:
        >>> check_bool(False, "progress")
        False
        >>> check_bool("no", "progress")
        Traceback (most recent call last):
        ...
        TypeError: progress: expected True or False, got str 'no'
    """
    if isinstance(value, bool) or (optional and value is None):
        return value  # type: ignore[return-value]
    allowed = "True, False or None" if optional else "True or False"
    raise TypeError(f"{name}: expected {allowed}, got {type(value).__name__} {value!r}")


def check_binary_mask(mask: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless every entry of ``mask`` is 0 or 1 (any dtype, or bool).

    A mask of 2s or 0.5s would silently weight tokens instead of selecting them. Skipped
    while ``torch.compile`` traces (a read-back would break the graph).

    Examples:
        >>> check_binary_mask(torch.tensor([[1, 0, 1]]), "attention_mask")
    """
    if mask.dtype == torch.bool or torch.compiler.is_compiling():
        return
    if mask.is_complex():
        raise TypeError(f"{name}: expected a bool, integer or float mask, got dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        examples = sorted(set(mask[bad].tolist()))[:4]
        raise ValueError(
            f"{name}: expected entries 0 or 1 (or a bool mask), got values such as {examples}"
        )


def check_module_data(module: nn.Module, name: str) -> None:
    """Raise ``ValueError`` if a parameter or buffer of ``module`` is on the ``meta`` device.

    Examples:
        >>> check_module_data(nn.Linear(2, 2), "head")
    """
    for label, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_meta:
            raise ValueError(
                f"{name}: expected a module with data, but {label!r} is on the meta device; "
                "materialise it first (module.to_empty(device='cpu') and load its weights)"
            )


def check_not_meta(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` for a tensor on the ``meta`` device (shape only, no data).

    Examples:
        >>> check_not_meta(torch.zeros(2), "source")
    """
    if x.is_meta:
        raise ValueError(
            f"{name}: expected a tensor with data, got a meta-device tensor of shape "
            f"{tuple(x.shape)}; materialise it first (e.g. module.to_empty(device='cpu') and "
            "load weights, or build the inputs on a real device)"
        )


def check_positive(
    value: object, name: str, *, strict: bool = True, integer: bool = False
) -> float:
    """Check that ``value`` is a finite (strictly) positive number; return it as a float.

    Examples:
        >>> check_positive(2, "temperature")
        2.0
    """
    allowed: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name}: expected {kind}, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number < 0 or (strict and number == 0):
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{name}: expected a finite value {bound}, got {value!r}")
    return number


#: The largest seed torch's and NumPy's generators both accept.
MAX_SEED = 2**64 - 1


def check_seed(value: object, name: str = "seed") -> int:
    """Check a random seed: an integer in ``[0, 2**64 - 1]``; return it as an ``int``.

    Examples:
        >>> check_seed(0)
        0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if not 0 <= int(value) <= MAX_SEED:
        raise ValueError(f"{name}: expected an integer in [0, 2**64 - 1], got {value}")
    return int(value)


def check_in_range(value: object, name: str, low: float, high: float) -> float:
    """Check that ``value`` is a number in the closed interval ``[low, high]``.

    Examples:
        >>> check_in_range(0.5, "dropout", 0.0, 1.0)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if not (low <= float(value) <= high):
        raise ValueError(f"{name}: expected a value in [{low}, {high}], got {value!r}")
    return float(value)


def check_finite(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` if the floating tensor ``x`` holds NaN or infinity.

    Skipped while ``torch.compile`` traces (``torch.compiler.is_compiling()``): reading a
    value back would break the graph.

    Examples:
        >>> check_finite(torch.zeros(2), "source")
    """
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; skipped while compiling
    if x.is_floating_point() and x.numel() > 0 and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries")


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    floating: bool = False,
    finite: bool = True,
    min_samples: int = 0,
) -> Tensor:
    """Check that ``x`` is a tensor with the expected rank and values; return it.

    Args:
        x: the value to check.
        name: the argument's name, used in error messages.
        ndim: allowed number of dimensions (an int or several).
        floating: require a floating-point dtype.
        finite: reject NaN/inf (floating tensors only).
        min_samples: minimum size of the first dimension.

    Examples:
        >>> check_tensor(torch.zeros(3, 2), "source", ndim=2).shape
        torch.Size([3, 2])
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_not_meta(x, name)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if min_samples and (x.dim() == 0 or x.shape[0] < min_samples):
        got = 0 if x.dim() == 0 else x.shape[0]
        raise ValueError(f"{name}: expected at least {min_samples} samples, got {got}")
    if finite:
        check_finite(x, name)
    return x


def check_features(x: object, name: str, *, min_samples: int = 1) -> Tensor:
    """Check a ``(N, D)`` floating, finite feature matrix with ``N >= min_samples``.

    Examples:
        >>> check_features(torch.randn(4, 3), "target").shape
        torch.Size([4, 3])
    """
    tensor = check_tensor(x, name, ndim=2, floating=True, min_samples=min_samples)
    if tensor.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one feature column, got shape (N, 0)")
    return tensor


def check_pair(a: Tensor, b: Tensor, names: tuple[str, str], *, same_dim: bool = True) -> None:
    """Check that two tensors share device and dtype (and feature dimension).

    Examples:
        >>> check_pair(torch.zeros(2, 3), torch.zeros(5, 3), ("source", "target"))
    """
    first, second = names
    if a.device != b.device:
        raise ValueError(
            f"{first} and {second}: expected tensors on the same device, "
            f"got {a.device} and {b.device}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{first} and {second}: expected the same dtype, got {a.dtype} and {b.dtype}; "
            "cast one of them (e.g. .float())"
        )
    if same_dim and a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{first} and {second}: expected the same feature shape, got "
            f"{tuple(a.shape[1:])} and {tuple(b.shape[1:])}"
        )


def check_same_width(
    a: _Shaped, b: _Shaped, names: tuple[str, str], *, what: str = "feature dimension"
) -> None:
    """Check that two ``(N, D)`` arrays or tensors have the same number of columns ``D``.

    Examples:
        >>> import numpy as np
        >>> check_same_width(np.zeros((2, 3)), np.zeros((5, 4)), ("source", "target"))
        Traceback (most recent call last):
        ...
        ValueError: source and target: expected the same feature dimension, got 3 and 4
    """
    if a.shape[1] != b.shape[1]:
        first, second = names
        raise ValueError(
            f"{first} and {second}: expected the same {what}, got {a.shape[1]} and {b.shape[1]}"
        )


def check_labels(
    y: object, name: str, *, num_samples: int | None = None, num_classes: int | None = None
) -> Tensor:
    """Check a ``(N,)`` integer label tensor, optionally its length and range.

    Examples:
        >>> check_labels(torch.tensor([0, 2, 1]), "labels", num_classes=3).tolist()
        [0, 2, 1]
    """
    labels = check_tensor(y, name, ndim=1, finite=False)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {labels.dtype}")
    if num_samples is not None and labels.shape[0] != num_samples:
        raise ValueError(f"{name}: expected {num_samples} labels, got {labels.shape[0]}")
    if labels.numel() > 0:
        if labels.dtype in UNSIGNED_WIDE:  # no min/max kernels in torch: read via NumPy
            host = labels.detach().cpu().numpy()
            low, high = int(host.min()), int(host.max())
            if high > torch.iinfo(torch.int64).max:
                raise ValueError(f"{name}: expected class indices below 2**63, got {high}")
        else:
            low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            limit = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
            raise ValueError(f"{name}: expected class indices in {limit}, got [{low}, {high}]")
    return labels

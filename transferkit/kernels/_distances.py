"""Squared distances in GEMM form, and the magnitude screening shared by kernels and losses."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._precision import as_compute, compute_dtype, no_autocast
from .._validation import check_features, check_pair, check_tensor

__all__ = [
    "overflow_error",
    "pairwise_squared_distances",
    "pooled_mean_squared_distance",
    "rescale_factor",
    "screen_features",
    "sq_distances_raw",
]


def screen_features(x: object, name: str, min_samples: int = 1) -> float:
    """`check_features` in one pass; returns ``max |x|`` (``nan`` while compiling).

    ``max(|min|, |max|)`` (one ``aminmax`` pass) is finite exactly when every entry is,
    so it screens for NaN/inf and gives the magnitude `rescale_factor` needs. The
    exact, counting check runs only when the screen fails.
    """
    tensor = check_tensor(x, name, ndim=2, floating=True, min_samples=min_samples, finite=False)
    if tensor.shape[1] == 0:
        check_features(tensor, name, min_samples=min_samples)  # the shared message
    if torch.compiler.is_compiling():
        return math.nan  # a read-back would break the graph: no screen, no rescaling
    if tensor.numel() == 0:
        return 0.0
    # One vectorised pass (min and max propagate NaN); much faster than an inf-norm.
    low, high = torch.aminmax(tensor.detach())
    lowest, highest = float(low), float(high)
    finite = math.isfinite(lowest) and math.isfinite(highest)
    largest = max(-lowest, highest) if finite else math.inf
    if not math.isfinite(largest):
        check_features(tensor, name, min_samples=min_samples)  # raises, counting the entries
    return largest


def rescale_factor(largest: float, dim: int, dtype: torch.dtype, *, power: int = 2) -> float:
    """A power of two ``c`` to divide inputs by so that degree-``power`` terms stay normal.

    ``largest`` is ``max |x|`` over the inputs, ``dim`` the feature dimension. Squared
    distances (``power=2``) reach ``4 D max|x|^2``, covariance products (``power=4``) the
    square of that; ``c = 1`` (no rescaling, bit-identical results) while those stay a
    factor 64 below the dtype's maximum and ``max|x|^power`` above ``2^24`` times its
    smallest normal number. Otherwise ``c`` is the power of two that moves ``max|x|`` just
    inside that range (a factor 16 from its edge), not to one: the smaller values of
    mixed-scale data then stay as far from the subnormal range as they can.
    """
    if not math.isfinite(largest) or largest == 0.0:
        return 1.0
    info = torch.finfo(compute_dtype(dtype))
    high = (info.max / 64.0) ** (1.0 / power) / (2.0 * math.sqrt(dim))
    low = (info.tiny * 2.0**24) ** (1.0 / power)
    if low <= largest <= high:
        return 1.0
    target = high / 16.0 if largest > high else low * 16.0
    return math.ldexp(1.0, math.frexp(largest)[1] - math.frexp(target)[1])


def overflow_error(names: str, largest: float, dtype: torch.dtype, what: str) -> ValueError:
    """The error for a result that does not fit ``dtype`` (NaN/inf would come back)."""
    return ValueError(
        f"{names}: expected features whose {what} fit {dtype} (max about "
        f"{torch.finfo(dtype).max:.1e}), got values up to {largest:.1e}; standardise the "
        "features (e.g. divide by their norm) or pass float64 tensors"
    )


def pooled_mean_squared_distance(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Mean of the off-diagonal squared distances of the rows of ``x`` (and ``y``), detached.

    Uses the identity ``sum_{i != j} ||z_i - z_j||^2 = 2 N sum_i ||z_i - mean||^2``, so it
    costs ``O(N D)`` and never forms the ``(N, N)`` matrix. Returns a 0-d tensor.
    """
    parts = [as_compute(x.detach())]
    if y is not None and y is not x:
        parts.append(as_compute(y.detach()))
    count = sum(p.shape[0] for p in parts)
    if count < 2:
        return torch.ones((), dtype=parts[0].dtype, device=parts[0].device)
    # Sum of squared deviations per part, combined with the parallel-variance formula.
    means = [p.mean(0) for p in parts]
    spread = torch.stack([((p - mu) ** 2).sum() for p, mu in zip(parts, means, strict=True)]).sum()
    if len(parts) == 2:
        gap = means[0] - means[1]
        spread = spread + parts[0].shape[0] * parts[1].shape[0] / count * (gap * gap).sum()
    return 2.0 * spread / (count - 1)


def sq_distances_raw(x: Tensor, y: Tensor, centre: Tensor | None) -> Tensor:
    """Squared distances in GEMM form for compute-dtype ``x``, ``y`` (no validation)."""
    if centre is not None:
        x = x - centre
        y = y - centre
    x_norm = (x * x).sum(1, keepdim=True)
    y_norm = (y * y).sum(1)
    return torch.addmm(x_norm + y_norm, x, y.T, alpha=-2.0).clamp_min(0.0)


def pairwise_squared_distances(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances between the rows of ``x`` and ``y`` in GEMM form.

    Computes ``||x_i||^2 + ||y_j||^2 - 2 x_i . y_j`` with one matrix multiplication after
    subtracting the (detached) mean of the pooled rows, which leaves the distances
    unchanged but avoids cancellation when the features are far from the origin. Results
    are clamped at zero; ``y=None`` (or ``y is x``) gives exact zeros on the diagonal.
    fp16/bf16 inputs are computed and returned in fp32, also under autocast.

    Args:
        x: first set of points.
        y: second set of points; ``None`` means ``x``.

    Returns:
        The ``(N, M)`` matrix of squared distances.

    Shape:
        - x: ``(N, D)``; y: ``(M, D)``.
        - Output: ``(N, M)``.

    Raises:
        ValueError: if an input is not a finite 2-D tensor, the feature dimensions differ,
            or a squared distance exceeds the dtype's range.
        TypeError: for non-floating inputs or mixed dtypes.

    Examples:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> pairwise_squared_distances(x)
        tensor([[ 0., 25.],
                [25.,  0.]])
    """
    largest = screen_features(x, "x")
    same = y is None or y is x
    if y is not None and not same:
        largest = max(largest, screen_features(y, "y"))
        check_pair(x, y, ("x", "y"))
    with no_autocast(x.device):
        xc = as_compute(x)
        yc = xc if same or y is None else as_compute(y)
        scale = rescale_factor(largest, xc.shape[1], xc.dtype)
        if scale != 1.0:
            xc = xc / scale
            yc = xc if same else yc / scale
        rows = xc.detach() if same else torch.cat([xc.detach(), yc.detach()])
        out = sq_distances_raw(xc, yc, rows.mean(0))
        if same:
            out = torch.diagonal_scatter(out, out.new_zeros(out.shape[0]))
        if scale != 1.0:
            out = out * scale * scale  # two steps: scale**2 alone may overflow the dtype
            if not bool(torch.isfinite(out.detach()).all()):
                raise overflow_error("x and y", largest, out.dtype, "squared distances")
    return out

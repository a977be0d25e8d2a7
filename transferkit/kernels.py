"""Kernels: pairwise squared distances in GEMM form and the kernels built on them.

Every kernel is a callable object, ``kernel(x, y) -> (N, M)``, for ``x: (N, D)`` and
``y: (M, D)``. Kernels come in two families that [`transferkit.losses`][] evaluates
block by block without autograd graphs of size ``(N, M)``:

- *distance* kernels ([`GaussianKernel`][], [`LaplacianKernel`][]) are functions
  of the squared Euclidean distance ``||x - y||^2``;
- *inner-product* kernels ([`LinearKernel`][], [`PolynomialKernel`][]) are
  functions of ``x @ y.T``.

Distances are computed as ``||x||^2 + ||y||^2 - 2 x y^T`` (one matrix multiplication,
after subtracting a common, detached centre for accuracy), clamped at zero. Half
precision inputs (fp16/bf16, e.g. under `torch.autocast`) are computed in fp32.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ._validation import check_features, check_pair, check_positive

__all__ = [
    "GaussianKernel",
    "Kernel",
    "LaplacianKernel",
    "LinearKernel",
    "PolynomialKernel",
    "pairwise_squared_distances",
]

Family = Literal["distance", "inner"]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype computations on ``x`` run in: fp32 for half precision, else ``x.dtype``."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def as_compute(x: Tensor) -> Tensor:
    """``x`` cast to [`compute_dtype`][] (a no-op for fp32/fp64 inputs)."""
    dtype = compute_dtype(x)
    return x if x.dtype == dtype else x.to(dtype)


def no_autocast(device: torch.device) -> torch.autocast:
    """A context that disables autocast on ``device`` so that fp32 stays fp32."""
    return torch.autocast(device.type, enabled=False)


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


def _sq_distances_raw(x: Tensor, y: Tensor, centre: Tensor | None) -> Tensor:
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
        ValueError: if an input is not a finite 2-D tensor or the feature dimensions differ.
        TypeError: for non-floating inputs or mixed dtypes.

    Examples:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> pairwise_squared_distances(x)
        tensor([[ 0., 25.],
                [25.,  0.]])
    """
    check_features(x, "x")
    same = y is None or y is x
    if y is not None and not same:
        check_features(y, "y")
        check_pair(x, y, ("x", "y"))
    with no_autocast(x.device):
        xc = as_compute(x)
        yc = xc if same or y is None else as_compute(y)
        rows = xc.detach() if same else torch.cat([xc.detach(), yc.detach()])
        out = _sq_distances_raw(xc, yc, rows.mean(0))
        if same:
            out = torch.diagonal_scatter(out, out.new_zeros(out.shape[0]))
    return out


class Kernel(ABC):
    """Base class of transferkit's kernels: callable as ``kernel(x, y) -> (N, M)``.

    Subclasses say which ``family`` they belong to (``"distance"``: a function of the
    squared distance; ``"inner"``: a function of the inner product) and implement
    [`prepare`][] (data-dependent parameters such as a bandwidth, detached),
    [`from_base`][] (the kernel values from the base matrix, differentiable) and
    [`value_and_derivative`][] (values and derivative w.r.t. the base matrix, used by
    the memory-lean MMD path without autograd).
    """

    family: ClassVar[Family]

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Evaluate the kernel between the rows of ``x`` and of ``y``.

        Args:
            x: ``(N, D)`` points.
            y: ``(M, D)`` points.

        Returns:
            The ``(N, M)`` kernel matrix (fp32 for half-precision inputs).
        """
        check_features(x, "x")
        check_features(y, "y")
        check_pair(x, y, ("x", "y"))
        with no_autocast(x.device):
            xc = as_compute(x)
            yc = xc if y is x else as_compute(y)
            state = self.prepare(xc, yc)
            base = self.base(xc, yc, state)
            if y is x and self.family == "distance":
                base = torch.diagonal_scatter(base, base.new_zeros(base.shape[0]))
            return self.from_base(base, state)

    def base(self, x: Tensor, y: Tensor, state: Tensor) -> Tensor:
        """The base matrix: squared distances (distance family) or ``x @ y.T`` (inner)."""
        if self.family == "inner":
            return x @ y.T
        centre = (x.detach().sum(0) + y.detach().sum(0)) / (x.shape[0] + y.shape[0])
        return _sq_distances_raw(x, y, centre)

    def paired(self, x: Tensor, y: Tensor, state: Tensor) -> Tensor:
        """Kernel values ``k(x_i, y_i)`` of matched rows, shape ``(N,)`` (for linear-time MMD)."""
        base = (x * y).sum(1) if self.family == "inner" else ((x - y) ** 2).sum(1)
        return self.from_base(base, state)

    @abstractmethod
    def prepare(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Data-dependent parameters from the pooled rows of ``x`` and ``y`` (detached)."""

    @abstractmethod
    def from_base(self, base: Tensor, state: Tensor) -> Tensor:
        """Kernel values from the base matrix (differentiable)."""

    @abstractmethod
    def value_and_derivative(self, base: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel values and their derivative w.r.t. the base matrix (no autograd).

        May overwrite ``base`` (e.g. store the derivative in its memory).
        """


def _positive_or_one(value: Tensor) -> Tensor:
    """``value`` where positive, else 1 (all points equal: any bandwidth gives the same)."""
    return torch.where(value > 0, value, torch.ones_like(value))


def _check_bandwidth(bandwidth: float | None) -> float | None:
    return None if bandwidth is None else check_positive(bandwidth, "bandwidth")


class GaussianKernel(Kernel):
    r"""Multi-bandwidth Gaussian (RBF) kernel, as in DAN's multi-kernel MMD.

    $$
    k(x, y) = \sum_m \exp\left(-\frac{\|x - y\|^2}{2\, m\, \sigma^2}\right)
    $$

    The multipliers ``m`` scale ``sigma^2`` (as DAN/TLlib's ``alpha`` values do). With
    ``bandwidth=None``, ``sigma^2`` is the **mean** of the off-diagonal squared distances
    of the pooled batch (the rows of ``x`` and ``y`` together), computed in ``O(N D)``
    without forming a distance matrix, and detached from the graph. (TLlib averages
    over all ``N^2`` entries, diagonal zeros included, which gives a ``sigma^2`` smaller by
    the factor ``(N - 1) / N``.) The mean was chosen over the median because it needs no
    ``(N, N)`` matrix, so the chunked MMD path can use it. All bandwidths share one
    distance matrix.

    Args:
        bandwidth: ``sigma``; ``None`` for the mean heuristic.
        multipliers: positive factors applied to ``sigma^2``, one kernel each.

    Examples:
        >>> kernel = GaussianKernel(bandwidth=1.0, multipliers=(1.0,))
        >>> x = torch.tensor([[0.0], [1.0]])
        >>> kernel(x, x).round(decimals=4)
        tensor([[1.0000, 0.6065],
                [0.6065, 1.0000]])
    """

    family: ClassVar[Family] = "distance"

    def __init__(
        self,
        bandwidth: float | None = None,
        multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    ) -> None:
        self.bandwidth = _check_bandwidth(bandwidth)
        if isinstance(multipliers, (int, float)) or len(multipliers) == 0:
            raise ValueError(
                f"multipliers: expected a non-empty sequence of positive numbers, "
                f"got {multipliers!r}"
            )
        self.multipliers = tuple(check_positive(m, "multipliers") for m in multipliers)
        order = sorted(self.multipliers, reverse=True)
        self._halving = all(a == 2.0 * b for a, b in itertools.pairwise(order))

    def __repr__(self) -> str:
        return f"GaussianKernel(bandwidth={self.bandwidth}, multipliers={self.multipliers})"

    def prepare(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``sigma^2`` as a 0-d tensor: fixed, or the pooled mean squared distance."""
        if self.bandwidth is not None:
            return torch.tensor(self.bandwidth**2, dtype=compute_dtype(x), device=x.device)
        return _positive_or_one(pooled_mean_squared_distance(x, y))

    def from_base(self, base: Tensor, state: Tensor) -> Tensor:
        """``sum_m exp(-d / (2 m sigma^2))`` for squared distances ``d``."""
        total = torch.zeros_like(base)
        for m in self.multipliers:
            total = total + torch.exp(base * (-0.5 / (m * state)))
        return total

    def value_and_derivative(self, base: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Values and ``dk/dd`` (no autograd; overwrites ``base`` with the derivative).

        When each multiplier is half the previous one (the default ``0.25 ... 4``), one
        ``exp`` serves all bandwidths: ``exp(-d / (m sigma^2)) = exp(-d / (2 m sigma^2))^2``,
        at a relative rounding error of at most ``2^(M-1)`` ulps (about ``2e-6`` in fp32).
        """
        order = sorted(self.multipliers, reverse=True)
        if self._halving:
            coef = -0.5 / (order[0] * state)
            power = torch.mul(base, coef).exp_()
            value = power.clone()
            derivative = torch.mul(power, coef, out=base)
            for _ in order[1:]:
                coef = coef * 2.0
                power.mul_(power)
                value.add_(power)
                derivative.addcmul_(power, coef)
            return value, derivative
        value = torch.zeros_like(base)
        derivative = torch.zeros_like(base)
        scratch = torch.empty_like(base)
        for m in order:
            coef = -0.5 / (m * state)
            torch.mul(base, coef, out=scratch).exp_()
            value.add_(scratch)
            derivative.addcmul_(scratch, coef)
        return value, derivative


class LaplacianKernel(Kernel):
    r"""Laplacian kernel $k(x, y) = \exp(-\|x - y\| / \sigma)$.

    With ``bandwidth=None``, ``sigma`` is the square root of the mean off-diagonal squared
    distance of the pooled batch (``O(N D)``, detached). The gradient at zero distance is
    set to zero (the kernel is not differentiable there).

    Args:
        bandwidth: ``sigma``; ``None`` for the heuristic.

    Examples:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> LaplacianKernel(bandwidth=5.0)(x, x).round(decimals=4)
        tensor([[1.0000, 0.3679],
                [0.3679, 1.0000]])
    """

    family: ClassVar[Family] = "distance"

    def __init__(self, bandwidth: float | None = None) -> None:
        self.bandwidth = _check_bandwidth(bandwidth)

    def __repr__(self) -> str:
        return f"LaplacianKernel(bandwidth={self.bandwidth})"

    def prepare(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``sigma`` as a 0-d tensor."""
        if self.bandwidth is not None:
            return torch.tensor(self.bandwidth, dtype=compute_dtype(x), device=x.device)
        return _positive_or_one(pooled_mean_squared_distance(x, y)).sqrt()

    def from_base(self, base: Tensor, state: Tensor) -> Tensor:
        """``exp(-sqrt(d) / sigma)`` with a zero gradient where ``d == 0``."""
        positive = base > 0
        distance = torch.where(positive, base, torch.ones_like(base)).sqrt() * positive
        return torch.exp(-distance / state)

    def value_and_derivative(self, base: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Values and ``dk/dd = -k / (2 sigma sqrt(d))`` (zero where ``d == 0``)."""
        distance = base.sqrt()
        value = torch.exp(distance / -state)
        safe = distance.clamp_min(torch.finfo(distance.dtype).tiny)
        derivative = value / (safe * (-2.0 * state))
        derivative.masked_fill_(base == 0, 0.0)
        return value, derivative


class LinearKernel(Kernel):
    """Linear kernel ``k(x, y) = x . y``; MMD with it compares the means.

    Examples:
        >>> x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
        >>> LinearKernel()(x, x)
        tensor([[5., 2.],
                [2., 1.]])
    """

    family: ClassVar[Family] = "inner"

    def __repr__(self) -> str:
        return "LinearKernel()"

    def prepare(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """No parameters: an empty tensor."""
        return torch.empty(0, dtype=compute_dtype(x), device=x.device)

    def from_base(self, base: Tensor, state: Tensor) -> Tensor:
        """The inner products themselves."""
        return base

    def value_and_derivative(self, base: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Values and a derivative of one."""
        return base, torch.ones_like(base)


class PolynomialKernel(Kernel):
    r"""Polynomial kernel $k(x, y) = (\gamma\, x \cdot y + c_0)^{p}$.

    Args:
        degree: the integer power ``p >= 1``.
        gamma: scale of the inner product; ``None`` means ``1 / D`` (as scikit-learn).
        coef0: the constant ``c_0``.

    Examples:
        >>> x = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
        >>> PolynomialKernel(degree=2, gamma=1.0, coef0=1.0)(x, x)
        tensor([[36.,  9.],
                [ 9.,  4.]])
    """

    family: ClassVar[Family] = "inner"

    def __init__(self, degree: int = 2, gamma: float | None = None, coef0: float = 1.0) -> None:
        self.degree = int(check_positive(degree, "degree", integer=True))
        self.gamma = None if gamma is None else check_positive(gamma, "gamma")
        if isinstance(coef0, bool) or not isinstance(coef0, (int, float)):
            raise TypeError(f"coef0: expected a number, got {type(coef0).__name__}")
        if not math.isfinite(coef0):
            raise ValueError(f"coef0: expected a finite number, got {coef0!r}")
        self.coef0 = float(coef0)

    def __repr__(self) -> str:
        return f"PolynomialKernel(degree={self.degree}, gamma={self.gamma}, coef0={self.coef0})"

    def prepare(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``gamma`` as a 0-d tensor."""
        gamma = 1.0 / x.shape[1] if self.gamma is None else self.gamma
        return torch.tensor(gamma, dtype=compute_dtype(x), device=x.device)

    def from_base(self, base: Tensor, state: Tensor) -> Tensor:
        """``(gamma * g + coef0) ** degree``."""
        return (base * state + self.coef0) ** self.degree

    def value_and_derivative(self, base: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Values and ``degree * gamma * (gamma g + coef0) ** (degree - 1)``."""
        inner = base * state + self.coef0
        lower = inner ** (self.degree - 1) if self.degree > 1 else torch.ones_like(inner)
        return lower * inner, lower * (self.degree * state)

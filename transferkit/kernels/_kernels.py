"""The kernel classes: `Kernel` and the Gaussian, Laplacian, linear and polynomial kernels."""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .._precision import as_compute, compute_dtype, no_autocast
from .._validation import check_pair, check_positive
from ._distances import (
    overflow_error,
    pooled_mean_squared_distance,
    rescale_factor,
    screen_features,
    sq_distances_raw,
)

__all__ = [
    "Family",
    "GaussianKernel",
    "Kernel",
    "LaplacianKernel",
    "LinearKernel",
    "PolynomialKernel",
]

Family = Literal["distance", "inner"]


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
        largest = max(screen_features(x, "x"), screen_features(y, "y"))
        check_pair(x, y, ("x", "y"))
        with no_autocast(x.device):
            xc = as_compute(x)
            yc = xc if y is x else as_compute(y)
            scale = rescale_factor(largest, xc.shape[1], xc.dtype)
            if scale != 1.0 and self.family == "distance":
                xc = xc / scale
                yc = xc if y is x else yc / scale
            state = self.prepare_rescaled(xc, yc, scale)
            base = self.base(xc, yc, state)
            if y is x and self.family == "distance":
                base = torch.diagonal_scatter(base, base.new_zeros(base.shape[0]))
            out = self.from_base(base, state)
            if self.may_overflow(largest, xc.shape[1], xc.dtype) and not bool(
                torch.isfinite(out.detach()).all()
            ):
                raise overflow_error("x and y", largest, out.dtype, f"{self!r} values")
            return out

    def prepare_rescaled(self, x: Tensor, y: Tensor, scale: float) -> Tensor:
        """`prepare` for distance-kernel inputs already divided by ``scale``.

        ``scale`` is 1 for inputs of ordinary magnitude (then this is `prepare`).
        A data-driven parameter (a bandwidth heuristic) is scale-free; a fixed one must
        be divided by ``scale`` too, which kernels with one override. The default raises
        for ``scale != 1``, so a custom kernel never silently mixes units.
        """
        if scale == 1.0 or self.family == "inner":
            return self.prepare(x, y)
        raise ValueError(
            f"x: {type(self).__name__} got inputs whose squared distances overflow "
            f"{x.dtype} and does not support rescaling them; standardise the features"
        )

    def value_bound(self, largest: float, dim: int) -> float:
        """An upper bound on ``|k(x, y)|`` for ``max |x|, max |y| <= largest`` (inf: unknown)."""
        return math.inf

    def may_overflow(self, largest: float, dim: int, dtype: torch.dtype) -> bool:
        """Whether kernel values (or sums of them) might overflow ``dtype``."""
        if math.isnan(largest):
            return False  # compiling: no read-backs
        try:
            bound = self.value_bound(largest, dim)
        except OverflowError:
            return True
        return not bound * 16.0 < torch.finfo(compute_dtype(dtype)).max

    def base(self, x: Tensor, y: Tensor, state: Tensor) -> Tensor:
        """The base matrix: squared distances (distance family) or ``x @ y.T`` (inner)."""
        if self.family == "inner":
            return x @ y.T
        centre = (x.detach().sum(0) + y.detach().sum(0)) / (x.shape[0] + y.shape[0])
        return sq_distances_raw(x, y, centre)

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


def _square(value: float) -> float:
    """``value ** 2``, ``inf`` where the Python float overflows (``_fixed_state`` caps it)."""
    return value * value if value < 1e150 else math.inf


def _fixed_state(value: float, x: Tensor, smallest_multiplier: float = 1.0) -> Tensor:
    """A fixed kernel parameter as a 0-d tensor of ``x``'s compute dtype, kept normal.

    The clamp keeps ``-1 / (m * value)`` finite: where it acts, every off-diagonal
    kernel value is already ``exp(-huge) = 0`` or ``exp(-tiny) = 1`` to working precision.
    Without it a bandwidth whose square underflows the dtype (``1e-20`` in fp32) made
    ``0 * -inf = NaN`` on the diagonal, where the distance is 0.
    """
    dtype = compute_dtype(x)
    info = torch.finfo(dtype)
    floor = 4.0 * info.tiny / min(smallest_multiplier, 1.0)
    return torch.tensor(min(max(value, floor), info.max), dtype=dtype, device=x.device)


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

    def __repr__(self) -> str:
        return f"GaussianKernel(bandwidth={self.bandwidth}, multipliers={self.multipliers})"

    def prepare(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``sigma^2`` as a 0-d tensor: fixed, or the pooled mean squared distance."""
        if self.bandwidth is not None:
            return _fixed_state(_square(self.bandwidth), x, min(self.multipliers))
        return _positive_or_one(pooled_mean_squared_distance(x, y))

    def prepare_rescaled(self, x: Tensor, y: Tensor, scale: float) -> Tensor:
        """``sigma^2`` in the units of inputs divided by ``scale`` (the heuristic is scale-free)."""
        if scale == 1.0 or self.bandwidth is None:
            return self.prepare(x, y)
        return _fixed_state(_square(self.bandwidth / scale), x, min(self.multipliers))

    def value_bound(self, largest: float, dim: int) -> float:
        """Each of the ``len(multipliers)`` terms is at most one."""
        return float(len(self.multipliers))

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
        # Read from the attribute at every call (not cached at construction): a kernel
        # whose multipliers were reassigned must not take the halving path of the old ones.
        order = sorted(self.multipliers, reverse=True)
        if all(a == 2.0 * b for a, b in itertools.pairwise(order)):
            # dk/dd = c (p + 2 p^2 + 4 p^4 + ...) with c = -1 / (2 m_max sigma^2): the
            # powers of two are exact, so one multiplication by c comes last.
            coef = state.reciprocal().mul_(-0.5 / order[0])
            power = torch.mul(base, coef).exp_()
            value = power.clone()
            derivative = base.copy_(power)
            for index in range(1, len(order)):
                power.mul_(power)
                value.add_(power)
                derivative.add_(power, alpha=2.0**index)
            return value, derivative.mul_(coef)
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
            return _fixed_state(self.bandwidth, x)
        return _positive_or_one(pooled_mean_squared_distance(x, y)).sqrt()

    def prepare_rescaled(self, x: Tensor, y: Tensor, scale: float) -> Tensor:
        """``sigma`` in the units of inputs divided by ``scale`` (the heuristic is scale-free)."""
        if scale == 1.0 or self.bandwidth is None:
            return self.prepare(x, y)
        return _fixed_state(self.bandwidth / scale, x)

    def value_bound(self, largest: float, dim: int) -> float:
        """The kernel is at most one."""
        return 1.0

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

    def value_bound(self, largest: float, dim: int) -> float:
        """``|x . y| <= D max|x|^2``."""
        return dim * largest * largest

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

    def value_bound(self, largest: float, dim: int) -> float:
        """``(gamma D max|x|^2 + |coef0|) ** degree``."""
        gamma = 1.0 / dim if self.gamma is None else self.gamma
        return float((gamma * dim * largest * largest + abs(self.coef0)) ** self.degree)

    def from_base(self, base: Tensor, state: Tensor) -> Tensor:
        """``(gamma * g + coef0) ** degree``."""
        return (base * state + self.coef0) ** self.degree

    def value_and_derivative(self, base: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """Values and ``degree * gamma * (gamma g + coef0) ** (degree - 1)``."""
        inner = base * state + self.coef0
        lower = inner ** (self.degree - 1) if self.degree > 1 else torch.ones_like(inner)
        return lower * inner, lower * (self.degree * state)

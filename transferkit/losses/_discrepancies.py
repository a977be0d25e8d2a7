"""Domain discrepancies: MMD, joint MMD (JMMD) and Deep CORAL, as functions and modules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._precision import as_compute, compute_dtype, no_autocast
from .._validation import check_option, check_pair, check_positive
from ..kernels import Kernel
from ..kernels._distances import overflow_error, rescale_factor, screen_features
from ._engine import (
    ESTIMATORS,
    BlockedMMD,
    Estimator,
    assemble,
    check_kernel,
    check_pair_inputs,
    check_result,
    check_weights,
    linear_mmd,
    pooled_state,
    rescaled,
    stacked_weights,
    tile_rows,
    uniform_coefficients,
)

__all__ = ["CORALLoss", "JointMMDLoss", "MMDLoss", "coral", "joint_mmd", "mmd"]


def _check_estimator_and_chunk_size(estimator: object, chunk_size: object) -> Estimator:
    """The checked ``estimator``; ``chunk_size`` must be ``None`` or a positive integer."""
    checked = check_option(estimator, "estimator", ESTIMATORS)
    if chunk_size is not None:
        check_positive(chunk_size, "chunk_size", integer=True)
    return checked


def mmd(
    source: Tensor,
    target: Tensor,
    kernel: Kernel | None = None,
    estimator: Estimator = "unbiased",
    *,
    source_weights: Tensor | None = None,
    target_weights: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Squared maximum mean discrepancy between two feature batches.

    With ``K`` the kernel, ``s_i`` the ``N`` source and ``t_j`` the ``M`` target rows:

    - ``"biased"`` (V-statistic): $\frac{1}{N^2}\sum_{i,j} K(s_i, s_j) +
      \frac{1}{M^2}\sum_{i,j} K(t_i, t_j) - \frac{2}{NM}\sum_{i,j} K(s_i, t_j)$; always
      ``>= 0``.
    - ``"unbiased"`` (U-statistic, Gretton et al. 2012, eq. 3): the same with the
      diagonals ``i = j`` excluded from the within-domain sums, which are divided by
      ``N (N - 1)`` and ``M (M - 1)``; can be slightly negative. Needs ``N, M >= 2``.
    - ``"linear"`` (Gretton et al. 2012, Lemma 14): ``O((N + M) D)`` time and memory;
      consecutive samples are paired, $h_i = K(s_{2i}, s_{2i+1}) + K(t_{2i},
      t_{2i+1}) - K(s_{2i}, t_{2i+1}) - K(s_{2i+1}, t_{2i})$, and the estimate is the
      mean of the ``h_i``. Needs ``N == M >= 2``; with an odd size the last sample of each
      batch is left out. Higher variance than the quadratic estimators.

    Per-sample weights (normalised to sum to one per domain) replace the uniform
    ``1/N``, ``1/M``; the unbiased estimator then divides the within-domain sums by
    ``sum_{i != j} w_i w_j``. The quadratic estimators evaluate the kernel in square
    tiles of at most 256 x 256 entries, each tile of the symmetric matrix once, and
    form the gradient in the same pass, so memory stays ``O(256^2 + (N + M) D)`` at any
    batch size (``chunk_size`` caps the tile size further).

    Args:
        source: source features.
        target: target features.
        kernel: a kernel from [`transferkit.kernels`][]; default
            ``GaussianKernel()`` (5 bandwidths, mean heuristic).
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.
        source_weights: optional non-negative per-sample weights, ``(N,)``.
        target_weights: optional non-negative per-sample weights, ``(M,)``.
        chunk_size: at most this many rows (and columns) of the pooled kernel matrix
            per tile; ``None`` chooses (256).

    Returns:
        A 0-d tensor (fp32 for half-precision inputs).

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``; weights: ``(N,)`` and ``(M,)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite input, different feature dimensions, too few
            samples, an unknown estimator, unequal sizes for ``"linear"``, bad weights,
            or tensors on different devices.
        TypeError: non-floating input, mixed dtypes, or a kernel that is not a ``Kernel``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> source, target = torch.randn(64, 8), torch.randn(48, 8) + 1.0
        >>> bool(mmd(source, target) > mmd(source, torch.randn(48, 8)))
        True
        >>> x = torch.randn(16, 3)
        >>> float(mmd(x, x, estimator="biased"))
        0.0
    """
    estimator = check_option(estimator, "estimator", ESTIMATORS)
    kernel = check_kernel(kernel, shared=True)
    largest = check_pair_inputs(source, target, estimator, ("source", "target"))
    if estimator == "linear" and (source_weights is not None or target_weights is not None):
        raise ValueError("source_weights/target_weights: not supported by estimator='linear'")
    risky = kernel.may_overflow(largest, source.shape[1], source.dtype)
    with no_autocast(source.device):
        s, t, deferred = rescaled(kernel, source, target, largest, defer=estimator != "linear")
        w = check_weights(source_weights, "source_weights", s.shape[0], s)
        v = check_weights(target_weights, "target_weights", t.shape[0], t)
        if estimator == "unbiased":
            weighted = source_weights is not None or target_weights is not None
            for weights, name in ((w, "source_weights"), (v, "target_weights")):
                if weighted and float((weights * weights).sum().detach()) >= 1.0 - 1e-12:
                    raise ValueError(
                        f"{name}: the unbiased estimator needs at least two samples "
                        "with positive weight"
                    )
        if estimator == "linear":
            assert deferred is not None
            linear = linear_mmd([s], [t], [kernel], [deferred])
            return check_result(linear, "source and target", largest, risky)
        z = torch.cat([s, t])
        if kernel.family == "distance":
            z = z - z.detach().mean(0)
        state = pooled_state(z) if deferred is None else deferred
        uniform = source_weights is None and target_weights is None
        compiling = torch.compiler.is_compiling()
        if uniform and not compiling:  # three ops instead of seven
            weights = z.new_zeros(z.shape[0], 2)
            weights[: s.shape[0], 0] = 1.0 / s.shape[0]
            weights[s.shape[0] :, 1] = 1.0 / t.shape[0]
        else:
            weights = stacked_weights(w, v)
        if compiling:  # plain autograd ops: traceable without breaks
            base = kernel.base(z, z, state)
            if kernel.family == "distance":
                base = torch.diagonal_scatter(base, base.new_zeros(base.shape[0]))
            matrix = kernel.from_base(base, state)
            return assemble(weights.T @ matrix @ weights, matrix.diagonal(), w, v, estimator)
        rows = tile_rows(z.shape[0], chunk_size)
        track = torch.is_grad_enabled() and (z.requires_grad or weights.requires_grad)
        if uniform:
            coefficients = uniform_coefficients(s.shape[0], t.shape[0], estimator)
            value = BlockedMMD.apply(  # type: ignore[no-untyped-call]
                weights, s.shape[0], (kernel,), (state,), rows, track, coefficients, z
            )
        else:
            forms, diagonal = BlockedMMD.apply(  # type: ignore[no-untyped-call]
                weights, s.shape[0], (kernel,), (state,), rows, track, None, z
            )
            value = assemble(forms, diagonal, w, v, estimator)
        return check_result(value, "source and target", largest, risky)


class MMDLoss(nn.Module):
    """Squared MMD as a module; see [`mmd`][] for the estimators and options.

    Args:
        kernel: a kernel from [`transferkit.kernels`][]; default ``GaussianKernel()``.
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.
        chunk_size: rows of the pooled kernel matrix evaluated at once; ``None`` chooses.

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``.
        - Output: ``()``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> loss = MMDLoss(estimator="biased")
        >>> round(float(loss(torch.zeros(4, 2), torch.zeros(5, 2))), 4)
        0.0
    """

    def __init__(
        self,
        kernel: Kernel | None = None,
        estimator: Estimator = "unbiased",
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel = check_kernel(kernel)
        self.estimator = _check_estimator_and_chunk_size(estimator, chunk_size)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return f"kernel={self.kernel!r}, estimator={self.estimator!r}"

    def forward(
        self,
        source: Tensor,
        target: Tensor,
        *,
        source_weights: Tensor | None = None,
        target_weights: Tensor | None = None,
    ) -> Tensor:
        """Squared MMD between ``source`` and ``target`` (see [`mmd`][])."""
        return mmd(
            source,
            target,
            self.kernel,
            self.estimator,
            source_weights=source_weights,
            target_weights=target_weights,
            chunk_size=self.chunk_size,
        )


# --------------------------------------------------------------------------- JMMD


def joint_mmd(
    source: Sequence[Tensor],
    target: Sequence[Tensor],
    kernels: Sequence[Kernel],
    estimator: Estimator = "unbiased",
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Joint MMD (Long et al. 2017) over several layers.

    The joint kernel is the product of per-layer kernels,
    $K(i, j) = \prod_l k_l(z^l_i, z^l_j)$, and the estimate is the MMD of
    [`mmd`][] with that kernel. It runs on the same tiled engine as [`mmd`][]: no
    ``(N + M)^2`` matrix is formed, each tile of the symmetric joint matrix is evaluated
    once (one distance GEMM and one gradient GEMM per layer), and memory stays
    ``O(L tile^2 + (N + M) sum_l D_l)``.

    Args:
        source: per-layer source tensors, e.g. ``[features, softmax(logits)]``.
        target: per-layer target tensors, in the same order.
        kernels: one kernel per layer.
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.
        chunk_size: at most this many rows (and columns) of the pooled joint kernel
            matrix per tile; ``None`` chooses (256), as in [`mmd`][].

    Returns:
        A 0-d tensor.

    Shape:
        - source[l]: ``(N, D_l)``; target[l]: ``(M, D_l)``.
        - Output: ``()``.

    Raises:
        ValueError: different numbers of layers and kernels, different batch sizes across
            layers, or any problem [`mmd`][] reports for a layer.
        TypeError: a kernel that is not a ``Kernel``, or mixed dtypes.

    Examples:
        >>> from transferkit.kernels import GaussianKernel
        >>> _ = torch.manual_seed(0)
        >>> feats, probs = torch.randn(8, 4), torch.softmax(torch.randn(8, 3), 1)
        >>> kernels = [GaussianKernel(), GaussianKernel(bandwidth=0.92, multipliers=(1.0,))]
        >>> float(joint_mmd([feats, probs], [feats, probs], kernels, estimator="biased"))
        0.0
    """
    estimator = _check_estimator_and_chunk_size(estimator, chunk_size)
    for given, name in ((source, "source"), (target, "target"), (kernels, "kernels")):
        if isinstance(given, Tensor) or not isinstance(given, Sequence):
            raise TypeError(
                f"{name}: expected a list of per-layer values, got {type(given).__name__}"
            )
    if not (len(source) == len(target) == len(kernels)) or len(kernels) == 0:
        raise ValueError(
            f"source, target and kernels: expected the same positive number of layers, got "
            f"{len(source)}, {len(target)} and {len(kernels)}"
        )
    checked = [check_kernel(k, f"kernels[{i}]") for i, k in enumerate(kernels)]
    largest: list[float] = []
    for layer, (s, t) in enumerate(zip(source, target, strict=True)):
        names = (f"source[{layer}]", f"target[{layer}]")
        largest.append(check_pair_inputs(s, t, estimator, names))
        if s.shape[0] != source[0].shape[0] or t.shape[0] != target[0].shape[0]:
            raise ValueError(
                f"{names[0]} and {names[1]}: expected the batch sizes of layer 0 "
                f"({source[0].shape[0]}, {target[0].shape[0]}), got {s.shape[0]}, {t.shape[0]}"
            )
        check_pair(s, source[0], (names[0], "source[0]"), same_dim=False)
    # The joint kernel is a product: a layer may be safe alone and the product not.
    risky = any(
        k.may_overflow(big, s.shape[1], s.dtype)
        for k, big, s in zip(checked, largest, source, strict=True)
    )
    if not risky and len(checked) > 1 and not math.isnan(largest[0]):
        bound = math.prod(
            k.value_bound(big, s.shape[1])
            for k, big, s in zip(checked, largest, source, strict=True)
        )
        risky = not bound * 16.0 < torch.finfo(compute_dtype(source[0])).max
    with no_autocast(source[0].device):
        defer = estimator != "linear"
        layers = [
            rescaled(k, s, t, big, defer=defer)
            for k, s, t, big in zip(checked, source, target, largest, strict=True)
        ]
        srcs = [s for s, _, _ in layers]
        tgts = [t for _, t, _ in layers]
        top = max(largest)
        if estimator == "linear":
            linear_states: list[Tensor] = []
            for _, _, state in layers:
                assert state is not None  # not deferred
                linear_states.append(state)
            linear = linear_mmd(srcs, tgts, checked, linear_states)
            return check_result(linear, "source and target", top, risky)
        zs: list[Tensor] = []
        states: list[Tensor] = []
        for kernel, (s, t, deferred) in zip(checked, layers, strict=True):
            z = torch.cat([s, t])
            zs.append(z - z.detach().mean(0) if kernel.family == "distance" else z)
            states.append(pooled_state(zs[-1]) if deferred is None else deferred)
        n, m = srcs[0].shape[0], tgts[0].shape[0]
        w = torch.full((n,), 1.0 / n, dtype=zs[0].dtype, device=zs[0].device)
        v = torch.full((m,), 1.0 / m, dtype=zs[0].dtype, device=zs[0].device)
        weights = stacked_weights(w, v)
        if torch.compiler.is_compiling():  # plain autograd ops: traceable without breaks
            joint: Tensor | None = None
            for kernel, z, state in zip(checked, zs, states, strict=True):
                base = kernel.base(z, z, state)
                if kernel.family == "distance":
                    base = torch.diagonal_scatter(base, base.new_zeros(base.shape[0]))
                layer_value = kernel.from_base(base, state)
                joint = layer_value if joint is None else joint * layer_value
            assert joint is not None
            forms, diagonal = weights.T @ joint @ weights, joint.diagonal()
        else:
            rows = tile_rows(n + m, chunk_size, len(zs))
            track = torch.is_grad_enabled() and any(z.requires_grad for z in zs)
            value = BlockedMMD.apply(  # type: ignore[no-untyped-call]
                weights,
                n,
                tuple(checked),
                tuple(states),
                rows,
                track,
                uniform_coefficients(n, m, estimator),
                *zs,
            )
            return check_result(value, "source and target", top, risky)
        value = assemble(forms, diagonal, w, v, estimator)
        return check_result(value, "source and target", top, risky)


class JointMMDLoss(nn.Module):
    """Joint MMD (JMMD, Long et al. 2017) as a module; see [`joint_mmd`][].

    Args:
        kernels: one kernel per layer, e.g. ``[GaussianKernel(), GaussianKernel(
            bandwidth=0.92, multipliers=(1.0,))]`` for bottleneck features and softmax
            outputs as in JAN.
        estimator: ``"biased"``, ``"unbiased"`` or ``"linear"``.
        chunk_size: rows (and columns) of the pooled joint kernel matrix per tile;
            ``None`` chooses.

    Shape:
        - source: a sequence of ``(N, D_l)``; target: a sequence of ``(M, D_l)``.
        - Output: ``()``.

    Examples:
        >>> from transferkit.kernels import GaussianKernel, LinearKernel
        >>> _ = torch.manual_seed(0)
        >>> loss = JointMMDLoss([GaussianKernel(), LinearKernel()], estimator="biased")
        >>> s = [torch.randn(6, 4), torch.softmax(torch.randn(6, 3), 1)]
        >>> float(loss(s, s))
        0.0
    """

    def __init__(
        self,
        kernels: Sequence[Kernel],
        estimator: Estimator = "unbiased",
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(kernels, Kernel) or not isinstance(kernels, Sequence) or not kernels:
            raise TypeError("kernels: expected a non-empty list of kernels, one per layer")
        self.kernels = [check_kernel(k, f"kernels[{i}]") for i, k in enumerate(kernels)]
        self.estimator = _check_estimator_and_chunk_size(estimator, chunk_size)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        """Constructor arguments shown by ``repr``."""
        return f"kernels={self.kernels!r}, estimator={self.estimator!r}"

    def forward(self, source: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
        """Joint MMD between per-layer ``source`` and ``target`` tensors."""
        return joint_mmd(source, target, self.kernels, self.estimator, chunk_size=self.chunk_size)


# --------------------------------------------------------------------------- CORAL


def coral(source: Tensor, target: Tensor) -> Tensor:
    r"""Deep CORAL loss (Sun & Saenko 2016).

    $$
    \frac{1}{4 d^2} \| C_S - C_T \|_F^2
    $$

    with unbiased (``n - 1``) covariance matrices $C_S$, $C_T$ of the two
    batches and ``d`` the feature dimension.

    Args:
        source: source features (at least 2 samples).
        target: target features (at least 2 samples).

    Returns:
        A 0-d tensor.

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``.
        - Output: ``()``.

    Raises:
        ValueError: non-2-D or non-finite input, fewer than 2 samples, different feature
            dimensions or devices, or a loss beyond the dtype's range (features of
            magnitude ``1e10`` and more in fp32; smaller ones are rescaled exactly).
        TypeError: non-floating input or mixed dtypes.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(32, 4)
        >>> float(coral(x, x + 3.0))  # a shift leaves the covariance unchanged
        0.0
        >>> bool(coral(x, 2.0 * x) > 0)
        True
    """
    largest = max(screen_features(source, "source", 2), screen_features(target, "target", 2))
    check_pair(source, target, ("source", "target"))
    with no_autocast(source.device):
        s, t = as_compute(source), as_compute(target)
        dim = s.shape[1]
        # Covariance products grow as |x|^4 (fp32 overflows from |x| ~ 1e9): extreme
        # magnitudes are computed in float64 (a D x D problem, cheap) and the result is
        # checked to fit the input's precision.
        extreme = rescale_factor(largest, dim, s.dtype, power=4) != 1.0
        if extreme:
            s, t = s.double(), t.double()
        loss = ((_covariance(s) - _covariance(t)) ** 2).sum() / (4.0 * dim * dim)
        if extreme:
            loss = loss.to(compute_dtype(source))
            if not bool(torch.isfinite(loss.detach())):
                raise overflow_error("source and target", largest, loss.dtype, "CORAL loss")
        return loss


def _covariance(x: Tensor) -> Tensor:
    centred = x - x.mean(0, keepdim=True)
    return centred.T @ centred / (x.shape[0] - 1)


class CORALLoss(nn.Module):
    """Deep CORAL loss as a module; see [`coral`][].

    Shape:
        - source: ``(N, D)``; target: ``(M, D)``.
        - Output: ``()``.

    Examples:
        >>> x = torch.randn(10, 3)
        >>> float(CORALLoss()(x, x))
        0.0
    """

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        """CORAL loss between ``source`` and ``target``."""
        return coral(source, target)

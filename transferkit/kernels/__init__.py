"""Kernels: pairwise squared distances in GEMM form and the kernels built on them.

Every kernel is a callable object, ``kernel(x, y) -> (N, M)``, for ``x: (N, D)`` and
``y: (M, D)``. Kernels come in two families that [`transferkit.losses`][] evaluates
block by block without autograd graphs of size ``(N, M)``:

- *distance* kernels ([`GaussianKernel`][], [`LaplacianKernel`][]) are functions
  of the squared Euclidean distance ``||x - y||^2``;
- *inner-product* kernels ([`LinearKernel`][], [`PolynomialKernel`][]) are
  functions of ``x @ y.T``.

[`gram`][] computes a whole kernel matrix in row strips without autograd (memory
bounded, exactly symmetric for ``y=None``), as the estimators of
[`transferkit.sklearn`][] need it.

Distances are computed as ``||x||^2 + ||y||^2 - 2 x y^T`` (one matrix multiplication,
after subtracting a common, detached centre for accuracy), clamped at zero. Half
precision inputs (fp16/bf16, e.g. under `torch.autocast`) are computed in fp32.

**Extreme magnitudes.** Finite inputs whose squares would overflow (``|x|`` near
``1e19`` in fp32) or fall into the subnormal range (``|x|`` below about ``1e-16``) are
divided by a detached power of two before the distances are formed; power-of-two
scaling is exact, so the kernel values are those of the unscaled formula, and inputs of
ordinary magnitude take exactly the old path. The distance kernels are then finite at
any finite scale (the bandwidth is rescaled with the data). Where the true result
itself does not fit the dtype (a linear kernel on ``1e20`` features, squared distances
above ``3e38`` in fp32) a ``ValueError`` says so instead of returning NaN or inf.
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctests of the public objects below run in this namespace)

from .._public import publish
from ._distances import pairwise_squared_distances
from ._distances import rescale_factor as rescale_factor  # used by transferkit.sklearn
from ._gram import gram
from ._kernels import GaussianKernel, Kernel, LaplacianKernel, LinearKernel, PolynomialKernel

__all__ = [
    "GaussianKernel",
    "Kernel",
    "LaplacianKernel",
    "LinearKernel",
    "PolynomialKernel",
    "gram",
    "pairwise_squared_distances",
]

# Public objects report the package as their module (stable pickles, reprs and cache
# fingerprints whatever private file defines them).
publish(__name__, globals(), __all__)

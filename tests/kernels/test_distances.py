"""Tests of transferkit/kernels/_distances.py: pairwise squared distances and rescaling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from transferkit.kernels import GaussianKernel, LaplacianKernel, pairwise_squared_distances


def test_pairwise_squared_distances_match_scipy_far_from_origin() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 7)) + 1e3
    y = rng.normal(size=(13, 7)) + 1e3
    got = pairwise_squared_distances(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(got, cdist(x, y, "sqeuclidean"), rtol=1e-6, atol=1e-8)


def test_pairwise_squared_distances_of_one_set_are_symmetric_nonnegative_zero_diagonal() -> None:
    x = torch.randn(50, 8) * 100 + 5
    d = pairwise_squared_distances(x)
    assert torch.equal(d.diagonal(), torch.zeros(50))
    assert bool((d >= 0).all())
    torch.testing.assert_close(d, d.T, rtol=1e-5, atol=1e-2)


def test_pairwise_squared_distances_compute_in_fp32_under_bf16_autocast() -> None:
    x, y = torch.randn(16, 4), torch.randn(9, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_squared_distances(x, y)
        d_half = pairwise_squared_distances(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32 and d_half.dtype == torch.float32
    torch.testing.assert_close(d, torch.cdist(x, y) ** 2, rtol=1e-4, atol=1e-4)


def test_pairwise_squared_distances_gradcheck_float64() -> None:
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pairwise_squared_distances, (x, y))


def test_pairwise_squared_distances_at_1e18_match_float64_and_raise_beyond_fp32() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 3)) * 1e18).astype(np.float32).astype(np.float64)
    y = (rng.normal(size=(5, 3)) * 1e18).astype(np.float32).astype(np.float64)
    got = pairwise_squared_distances(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    np.testing.assert_allclose(got.double().numpy(), cdist(x, y, "sqeuclidean"), rtol=1e-5)
    same = pairwise_squared_distances(torch.from_numpy(x).float())
    assert torch.equal(same.diagonal(), torch.zeros(6))
    with pytest.raises(ValueError, match="x and y: expected features whose squared distances"):
        pairwise_squared_distances(torch.from_numpy(x * 100).float())


@pytest.mark.parametrize("largest", [1e20, 1e30, 1e-20, 1e-30])
def test_extreme_magnitudes_are_rescaled_by_an_exact_power_of_two(largest: float) -> None:
    # Squares of these magnitudes overflow fp32 (NaN from inf - inf) or fall below its
    # normal numbers unless the inputs are rescaled. The rescaling divides by a power of
    # two (exact) that brings them into range, so a fixed-bandwidth kernel on points and
    # bandwidth scaled by 2^k is bit-identical to the kernel on the unscaled ones.
    rng = np.random.default_rng(1)
    unit_x = torch.from_numpy(rng.normal(size=(7, 4))).float()
    unit_y = torch.from_numpy(rng.normal(size=(5, 4)) + 0.5).float()
    scale = math.ldexp(1.0, math.frexp(largest)[1])
    for make in (
        lambda bw: GaussianKernel(bandwidth=1.5 * bw, multipliers=(0.5, 1.0)),
        lambda bw: LaplacianKernel(bandwidth=2.0 * bw),
    ):
        got = make(scale)(unit_x * scale, unit_y * scale)
        assert bool(torch.isfinite(got).all())
        assert torch.equal(got, make(1.0)(unit_x, unit_y))


@pytest.mark.parametrize(("largest", "dim"), [(1e6, 512), (1e-12, 512)])
def test_ordinary_magnitudes_take_exactly_the_unscaled_path(largest: float, dim: int) -> None:
    # The rescaling is confined to extreme inputs: ordinary ones are bit-identical to the
    # formula without it (centre, squared norms, one GEMM, clamp at zero).
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(6, dim)) * largest).float()
    y = torch.from_numpy(rng.normal(size=(4, dim)) * largest).float()
    centre = torch.cat([x, y]).mean(0)
    xc, yc = x - centre, y - centre
    plain = torch.addmm((xc * xc).sum(1, keepdim=True) + (yc * yc).sum(1), xc, yc.T, alpha=-2.0)
    assert torch.equal(pairwise_squared_distances(x, y), plain.clamp_min(0.0))

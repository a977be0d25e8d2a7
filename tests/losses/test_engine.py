"""Tests of transferkit/losses/_engine.py: the blocked MMD/JMMD engine and linear-time MMD.

Tiles, chunking and memory of the tiled pass, checked through ``mmd`` and ``joint_mmd``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence

import pytest
import torch

from transferkit import losses as L
from transferkit.kernels import (
    GaussianKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    PolynomialKernel,
)

from .references import (
    KERNELS,
    naive_joint_mmd,
    sample,
)


def assert_same_tiles(
    automatic: Sequence[torch.Tensor],
    *,
    same: Sequence[torch.Tensor],
    other: Sequence[torch.Tensor],
) -> None:
    """The automatic tiling gives, bit for bit, the value and gradients of the ``same``
    tile size, and not those of the ``other`` size (which agree only to rounding)."""
    assert all(torch.equal(a, b) for a, b in zip(automatic, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(automatic, other, strict=True))
    for a, b in zip(automatic, other, strict=True):
        torch.testing.assert_close(a, b)


def test_linear_mmd_drops_the_last_sample_of_odd_batches() -> None:
    s, t = sample(9, 9)
    got = L.mmd(torch.from_numpy(s), torch.from_numpy(t), GaussianKernel(bandwidth=1.0), "linear")
    ref = L.mmd(
        torch.from_numpy(s[:8]), torch.from_numpy(t[:8]), GaussianKernel(bandwidth=1.0), "linear"
    )
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_chunked_path_equals_one_block_in_value_and_gradient(name: str, estimator: str) -> None:
    s0 = torch.randn(31, 6, dtype=torch.float64)
    t0 = torch.randn(22, 6, dtype=torch.float64) + 0.5

    def run(chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        value = L.mmd(s, t, KERNELS[name], estimator, chunk_size=chunk)
        value.backward()
        assert s.grad is not None and t.grad is not None
        return value.detach(), s.grad, t.grad

    whole = run(None)
    # 6 x 6 tiles are what a 40-element cache budget gave; 52 leaves a 1-row last tile.
    for chunk in (1, 6, 7, 52):
        for a, b in zip(run(chunk), whole, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_automatic_tiles_are_256_rows_below_the_block_budget() -> None:
    # 300 pooled rows: the automatic tiles are the 256-row cap, bit for bit as
    # chunk_size=256, and not one tile of 300 rows (any chunk_size above 256 is capped).
    gen = torch.Generator().manual_seed(0)
    s0 = torch.randn(160, 4, generator=gen, dtype=torch.float64)
    t0 = torch.randn(140, 4, generator=gen, dtype=torch.float64)

    def run(chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        s = s0.clone().requires_grad_()
        value = L.mmd(s, t0, chunk_size=chunk)
        value.backward()
        assert s.grad is not None
        return value.detach(), s.grad

    automatic, capped, smaller = run(None), run(256), run(255)
    assert all(torch.equal(a, b) for a, b in zip(automatic, run(300), strict=True))
    assert_same_tiles(automatic, same=capped, other=smaller)


@pytest.mark.slow
def test_automatic_chunking_kicks_in_above_the_block_limit() -> None:
    # The automatic tile also shrinks once (rows x pooled rows x layers) would pass the
    # engine's 2**24-element budget: 8 layers of 8200 pooled rows pass it at 256 rows
    # (8 x 8200 x 256 > 2**24), so the tiles shrink to 2**24 // (8 x 8200) = 255 rows,
    # bit for bit what chunk_size=255 gives (and not what 256-row tiles give).
    gen = torch.Generator().manual_seed(0)
    s0 = [torch.randn(4100, 1, generator=gen, dtype=torch.float64) for _ in range(8)]
    t0 = [torch.randn(4100, 1, generator=gen, dtype=torch.float64) + 0.1 for _ in range(8)]
    kernels: list[Kernel] = [LinearKernel()] * 8

    def run(chunk: int | None) -> list[torch.Tensor]:
        s = [x.clone().requires_grad_() for x in s0]
        value = L.joint_mmd(s, t0, kernels, "biased", chunk_size=chunk)
        value.backward()
        return [value.detach()] + [x.grad for x in s]  # type: ignore[misc]

    automatic, rows_255, rows_256 = run(None), run(255), run(256)
    assert_same_tiles(automatic, same=rows_255, other=rows_256)


@pytest.mark.slow
def test_chunked_path_handles_8192_per_domain_in_less_than_one_full_kernel_matrix() -> None:
    # One (2B)^2 fp32 matrix at B = 8192 is 1 GiB; the chunked path must stay far below.
    code = textwrap.dedent(
        """
        import torch, transferkit as tk
        torch.manual_seed(0)
        s = torch.randn(8192, 16, requires_grad=True)
        t = (torch.randn(8192, 16) + 0.1).requires_grad_()
        open("/proc/self/clear_refs", "w").write("5")
        before = int(open("/proc/self/statm").read().split()[1]) * 4096
        loss = tk.losses.mmd(s, t, tk.kernels.GaussianKernel(multipliers=(1.0,)))
        loss.backward()
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
        peak = int(hwm.split()[1]) * 1024 - before
        print(peak, float(loss), bool(torch.isfinite(s.grad).all()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, loss, finite = out.stdout.split()
    assert finite == "True" and float(loss) > 0
    assert int(peak) < 2**30 // 2, f"peak {int(peak) / 2**20:.0f} MiB"


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("chunk", [None, 6])
def test_joint_mmd_value_and_gradients_match_plain_autograd_float64(
    estimator: str, chunk: int | None
) -> None:
    # Three layers of all kernel families; chunk_size=6 forces 6 x 6 tiles that
    # straddle the source/target split (23 source rows), so every tile path is used.
    gen = torch.Generator().manual_seed(3)
    dims = (5, 3, 4)
    s0 = [torch.randn(23, d, generator=gen, dtype=torch.float64) for d in dims]
    t0 = [torch.randn(17, d, generator=gen, dtype=torch.float64) + 0.3 for d in dims]
    kernels: list[Kernel] = [
        GaussianKernel(),
        LaplacianKernel(bandwidth=1.5),
        PolynomialKernel(degree=2, gamma=0.3, coef0=1.0),
    ]

    def run(fn: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        s = [x.clone().requires_grad_() for x in s0]
        t = [x.clone().requires_grad_() for x in t0]
        value = fn(s, t, kernels, estimator)
        value.backward()
        return [value.detach()] + [x.grad for x in s + t]  # type: ignore[misc]

    def tiled(*args: object) -> torch.Tensor:
        return L.joint_mmd(*args, chunk_size=chunk)  # type: ignore[arg-type]

    for got, want in zip(run(tiled), run(naive_joint_mmd), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_joint_mmd_gradcheck_float64_three_layers_many_tiles() -> None:
    s = [torch.randn(5, d, dtype=torch.float64, requires_grad=True) for d in (3, 2, 2)]
    t = [torch.randn(4, d, dtype=torch.float64, requires_grad=True) for d in (3, 2, 2)]
    kernels = [GaussianKernel(bandwidth=1.2), LinearKernel(), LaplacianKernel(bandwidth=2.0)]

    def loss(*x: torch.Tensor) -> torch.Tensor:
        return L.joint_mmd(list(x[:3]), list(x[3:]), kernels, "unbiased", chunk_size=3)

    assert torch.autograd.gradcheck(loss, (*s, *t))


@pytest.mark.slow
def test_joint_mmd_at_4096_per_domain_keeps_no_full_kernel_matrix() -> None:
    # One (2B)^2 fp32 matrix at B = 4096 is 256 MiB; materialising JAN's matrices (and
    # their autograd graph) needed several; the blocked engine keeps only small tiles.
    code = textwrap.dedent(
        """
        import torch, transferkit as tk
        torch.manual_seed(0)
        s = [torch.randn(4096, 8, requires_grad=True), torch.rand(4096, 4, requires_grad=True)]
        t = [torch.randn(4096, 8).add(0.2).requires_grad_(), torch.rand(4096, 4).requires_grad_()]
        kernels = [tk.kernels.GaussianKernel(multipliers=(1.0,)), tk.kernels.LinearKernel()]
        open("/proc/self/clear_refs", "w").write("5")
        before = int(open("/proc/self/statm").read().split()[1]) * 4096
        loss = tk.losses.joint_mmd(s, t, kernels)
        loss.backward()
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
        peak = int(hwm.split()[1]) * 1024 - before
        print(peak, float(loss), bool(torch.isfinite(s[0].grad).all()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, loss, finite = out.stdout.split()
    assert finite == "True" and float(loss) == float(loss)
    assert int(peak) < 2**28 // 2, f"peak {int(peak) / 2**20:.0f} MiB"

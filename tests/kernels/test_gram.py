"""Tests of transferkit/kernels/_gram.py: the chunked Gram matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transferkit.kernels import GaussianKernel, LaplacianKernel, LinearKernel, gram

from .references import KERNELS, reference_kernel


def _points(n: int, m: int, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + 3.0, rng.normal(size=(m, d)) * 1.5 + 3.5


@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("name", list(KERNELS))
def test_gram_matches_numpy_reference_and_the_kernel_call(name: str, chunk: int) -> None:
    x, y = _points(13, 9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    got = gram(tx, ty, KERNELS[name], chunk_size=chunk)
    assert got.shape == (13, 9) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference_kernel(name, x, y), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, KERNELS[name](tx, ty), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", list(KERNELS))
def test_features_without_products_are_skipped_exactly(name: str, symmetric: bool) -> None:
    # Constant features (all zero after centring) and features that are zero in one side
    # only: the matrix product skips them, the norms must still count them.
    x, y = _points(11, 8, d=7)
    x[:, 1] = 0.0
    y[:, 1] = 0.0  # zero everywhere
    x[:, 3] = 2.5
    y[:, 3] = 2.5  # constant in both: zero after centring
    x[:, 5] = 0.0  # zero in x only: y's values still enter the distances
    y = x if symmetric else y
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    got = gram(tx, None if symmetric else ty, KERNELS[name])
    if symmetric and "heuristic" in name:  # the reference would pool x with itself
        torch.testing.assert_close(got, KERNELS[name](tx, tx), rtol=1e-10, atol=1e-10)
    else:
        expected = reference_kernel(name, x, y)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 7, 100, 4096])
@pytest.mark.parametrize("name", list(KERNELS))
def test_symmetric_gram_is_exactly_symmetric_with_exact_self_distances(
    name: str, chunk: int
) -> None:
    # 300 rows: more than one 256-row strip of the upper triangle whatever the chunk size.
    x, _ = _points(300, 1)
    tx = torch.from_numpy(x)
    got = gram(tx, None, KERNELS[name], chunk_size=chunk)
    assert torch.equal(got, got.T)
    if "heuristic" in name:  # the reference would pool x with itself: compare with k(x, x)
        torch.testing.assert_close(got, KERNELS[name](tx, tx), rtol=1e-10, atol=1e-10)
    else:
        np.testing.assert_allclose(got.numpy(), reference_kernel(name, x, x), rtol=1e-9, atol=1e-9)
    if KERNELS[name].family == "distance":  # k(x, x) from a distance of exactly zero
        expected = float(KERNELS[name](tx[:1], tx[:1]).item())
        assert bool((got.diagonal() == expected).all())
    assert torch.equal(gram(tx, tx, KERNELS[name], chunk_size=chunk), got)  # y is x


def test_heuristic_bandwidth_is_set_once_from_all_rows_not_per_strip() -> None:
    x, y = _points(40, 30)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for kernel in (GaussianKernel(), LaplacianKernel()):
        whole = kernel(tx, ty)
        torch.testing.assert_close(gram(tx, ty, kernel, chunk_size=4), whole)
        torch.testing.assert_close(gram(tx, None, kernel, chunk_size=4), kernel(tx, tx))


def test_float32_strips_accumulate_into_a_float64_out() -> None:
    x, y = _points(50, 20)
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    out = torch.full((50, 20), float("nan"), dtype=torch.float64)
    kernel = GaussianKernel(bandwidth=2.0)
    result = gram(tx, ty, kernel, chunk_size=8, out=out)
    assert result is out and out.dtype == torch.float64
    # The strips are float32 (the same values as a float32 Gram), stored exactly in float64.
    assert torch.equal(out, gram(tx, ty, kernel, chunk_size=8).double())
    xs, ys = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    d2 = ((xs[:, None, :] - ys[None, :, :]) ** 2).sum(-1)
    expected = sum(np.exp(-d2 / (2 * m * 4.0)) for m in (0.25, 0.5, 1.0, 2.0, 4.0))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    symmetric = torch.empty(50, 50, dtype=torch.float64)
    gram(tx, None, kernel, chunk_size=8, out=symmetric)
    assert torch.equal(symmetric, symmetric.T)
    torch.testing.assert_close(symmetric.float(), kernel(tx, tx), rtol=1e-5, atol=1e-6)


def test_half_precision_inputs_are_computed_in_float32_also_under_autocast() -> None:
    x = torch.randn(12, 4)
    kernel = GaussianKernel(bandwidth=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gram(x.bfloat16(), None, kernel, chunk_size=5)
        plain = gram(x, None, kernel, chunk_size=5)
    assert got.dtype == torch.float32 and plain.dtype == torch.float32
    torch.testing.assert_close(plain, kernel(x, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, kernel(x.bfloat16(), x.bfloat16()), rtol=1e-5, atol=1e-6)


def test_callables_get_row_strips_of_at_most_chunk_size_rows() -> None:
    seen: list[int] = []

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(a.shape[0])
        return a @ b.T

    x, y = torch.randn(23, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    got = gram(x, y, dot, chunk_size=5)
    assert seen == [5, 5, 5, 5, 3]
    torch.testing.assert_close(got, x @ y.T)
    with pytest.raises(ValueError, match=r"kernel: expected a \(5, 6\) matrix, got \(5, 5\)"):
        gram(x, y, lambda a, b: a @ a.T, chunk_size=5)
    with pytest.raises(ValueError, match="kernel: expected a"):
        gram(x, y, lambda a, b: "not a tensor", chunk_size=5)  # type: ignore[arg-type,return-value]


def test_no_autograd_and_inputs_untouched() -> None:
    x = torch.randn(10, 3, requires_grad=True)
    before = x.detach().clone()
    got = gram(x, None, GaussianKernel(), chunk_size=3)
    assert not got.requires_grad and got.grad_fn is None
    assert torch.equal(x.detach(), before)
    got.add_(1.0)  # an ordinary tensor (not an inference tensor): usable in place afterwards


def test_extreme_magnitudes_are_scale_free_or_raise_clearly() -> None:
    x, y = _points(8, 6)
    unit_x, unit_y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    kernel = GaussianKernel()
    torch.testing.assert_close(
        gram(unit_x * 1e20, unit_y * 1e20, kernel), gram(unit_x, unit_y, kernel)
    )
    torch.testing.assert_close(gram(unit_x * 1e-20, None, kernel), gram(unit_x, None, kernel))
    with pytest.raises(ValueError, match=r"x and y: expected features whose .* fit"):
        gram(unit_x * 1e20, unit_y * 1e20, LinearKernel())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x: gram(x, None, "rbf"), TypeError, "kernel: expected a transferkit"),
        (lambda x: gram(x, None, LinearKernel(), chunk_size=0), ValueError, "chunk_size"),
        (lambda x: gram(x, None, LinearKernel(), chunk_size=1.5), TypeError, "chunk_size"),
        (lambda x: gram(x, None, LinearKernel(), chunk_size=True), TypeError, "chunk_size"),
        (lambda x: gram(x, x[:3, :2], LinearKernel()), ValueError, "x and y"),
        (lambda x: gram(x, x.double(), LinearKernel()), TypeError, "x and y"),
        (lambda x: gram(x[:, 0], None, LinearKernel()), ValueError, "x"),
        (lambda x: gram(x * float("nan"), None, LinearKernel()), ValueError, "x"),
        (lambda x: gram(x, None, LinearKernel(), out=torch.empty(4, 5)), ValueError, "out"),
        (lambda x: gram(x, None, LinearKernel(), out=[[0.0]]), TypeError, "out"),
        (
            lambda x: gram(x, None, LinearKernel(), out=torch.empty(5, 5, dtype=torch.long)),
            TypeError,
            "out",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(
    call: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=f"^{match}"):
        call(torch.randn(5, 3))  # type: ignore[operator]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    m=st.integers(1, 40),
    chunk=st.integers(1, 50),
    name=st.sampled_from(["gaussian-fixed", "laplacian", "linear", "polynomial"]),
)
def test_any_chunking_gives_the_same_matrix(n: int, m: int, chunk: int, name: str) -> None:
    x, y = _points(n, m, d=3, seed=n * 100 + m)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    kernel = KERNELS[name]
    whole = gram(tx, ty, kernel, chunk_size=max(n, 1))
    torch.testing.assert_close(
        gram(tx, ty, kernel, chunk_size=chunk), whole, rtol=1e-13, atol=1e-12
    )
    symmetric = gram(tx, None, kernel, chunk_size=chunk)
    assert torch.equal(symmetric, symmetric.T)
    torch.testing.assert_close(symmetric, kernel(tx, tx), rtol=1e-12, atol=1e-10)

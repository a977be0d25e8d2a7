"""NumPy references, kernels and strategies shared by the tests of transferkit.losses."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import cdist
from scipy.special import entr, softmax
from torch import nn

import transferkit as tk
from transferkit import losses as L
from transferkit.kernels import (
    GaussianKernel,
    Kernel,
    LaplacianKernel,
    LinearKernel,
    PolynomialKernel,
)

from ..references import FP32_MAX as FP32_MAX  # re-exported for the loss tests
from ..references import MULTIPLIERS as MULTIPLIERS
from ..references import gaussian_sum, pooled_mean_sqdist

ESTIMATORS = ("biased", "unbiased", "linear")

# ----------------------------------------------------------------- NumPy references


def ref_gram(name: str, x: np.ndarray, y: np.ndarray, sigma2: float) -> np.ndarray:
    d2 = cdist(x, y, "sqeuclidean")
    if name == "gaussian":
        return gaussian_sum(d2, sigma2)
    if name == "laplacian":
        return np.exp(-np.sqrt(d2) / 1.7)
    if name == "linear":
        return x @ y.T
    if name == "polynomial":
        return (0.5 * x @ y.T + 1.0) ** 2
    raise AssertionError(name)


def ref_mmd(
    name: str,
    s: np.ndarray,
    t: np.ndarray,
    estimator: str,
    ws: np.ndarray | None = None,
    wt: np.ndarray | None = None,
) -> float:
    """Gretton et al. (2012) estimators, written from the formulas in float64."""
    sigma2 = pooled_mean_sqdist(s, t)

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return ref_gram(name, a, b, sigma2)

    n, m = len(s), len(t)
    if estimator == "linear":
        h = n // 2
        total = 0.0
        for i in range(h):
            x1, x2, y1, y2 = (
                s[2 * i : 2 * i + 1],
                s[2 * i + 1 : 2 * i + 2],
                t[2 * i : 2 * i + 1],
                t[2 * i + 1 : 2 * i + 2],
            )
            total += (k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)).item()
        return total / h
    ws = np.full(n, 1 / n) if ws is None else ws / ws.sum()
    wt = np.full(m, 1 / m) if wt is None else wt / wt.sum()
    kss, ktt, kst = k(s, s), k(t, t), k(s, t)
    cross = ws @ kst @ wt
    if estimator == "biased":
        return float(ws @ kss @ ws + wt @ ktt @ wt - 2 * cross)
    off_s = ~np.eye(n, dtype=bool)
    off_t = ~np.eye(m, dtype=bool)
    pair_s, pair_t = np.outer(ws, ws), np.outer(wt, wt)
    within_s = (pair_s * kss)[off_s].sum() / pair_s[off_s].sum()
    within_t = (pair_t * ktt)[off_t].sum() / pair_t[off_t].sum()
    return float(within_s + within_t - 2 * cross)


KERNELS: dict[str, Kernel] = {
    "gaussian": GaussianKernel(),
    "laplacian": LaplacianKernel(bandwidth=1.7),
    "linear": LinearKernel(),
    "polynomial": PolynomialKernel(degree=2, gamma=0.5, coef0=1.0),
}


def sample(n: int, m: int, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d)) * 1.3 + 0.4


# ----------------------------------------------------------------- properties


def assert_gradcheck_on_two_batches(loss: Callable[..., torch.Tensor]) -> None:
    """``torch.autograd.gradcheck`` of ``loss(a, b)`` on float64 batches of 6 and 7 rows."""
    a = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (a, b))


def assert_bf16_close_to_fp32(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> None:
    """``fn`` of the bfloat16 casts of ``args`` is float32 and within 1% of ``fn(*args)``."""
    ref = fn(*args)
    out = fn(*(x.bfloat16() for x in args))
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(float(ref), rel=1e-2)


finite_rows = arrays(
    np.float64,
    st.tuples(st.integers(2, 12), st.integers(1, 4)),
    elements=st.floats(-5, 5, allow_nan=False, width=64),
)


def naive_joint_mmd(
    source: list[torch.Tensor], target: list[torch.Tensor], kernels: list[Kernel], estimator: str
) -> torch.Tensor:
    """JMMD written directly with autograd: full kernel matrices, no engine."""
    joint = None
    for s, t, kernel in zip(source, target, kernels, strict=True):
        z = torch.cat([s, t])
        matrix = kernel(z, z)
        joint = matrix if joint is None else joint * matrix
    assert joint is not None
    n, m = source[0].shape[0], target[0].shape[0]
    kss, ktt, kst = joint[:n, :n], joint[n:, n:], joint[:n, n:]
    if estimator == "biased":
        return kss.mean() + ktt.mean() - 2 * kst.mean()
    within_s = (kss.sum() - kss.diagonal().sum()) / (n * (n - 1))
    within_t = (ktt.sum() - ktt.diagonal().sum()) / (m * (m - 1))
    return within_s + within_t - 2 * kst.mean()


# ----------------------------------------------------------------- L2-SP


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


# ----------------------------------------------------------------- end to end


def train_digits_mlp(task: tk.datasets.DomainTask, mmd_weight: float) -> float:
    """Train an MLP on labelled source digits (+ MMD to unlabelled target); target accuracy."""
    tk.seed_everything(0)
    net = tk.models.MLP(task.source_x.shape[1], task.num_classes, hidden=(64, 64))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step_loss(xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        fs, ft = net.forward_features(xs), net.forward_features(xt)
        loss = nn.functional.cross_entropy(net.fc(fs), ys)
        if mmd_weight:
            loss = loss + mmd_weight * L.mmd(fs, ft)
        return loss

    return fit_and_score(task, net, optimizer, step_loss, seed=0)


StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fit_and_score(
    task: tk.datasets.DomainTask,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: StepLoss,
    *,
    seed: int,
) -> float:
    """300 steps on 64-row source/target batches (loaders seeded ``seed``, ``seed + 1``)
    minimising ``step_loss(source_x, source_y, target_x)``; the target test accuracy."""
    source = tk.datasets.infinite(
        tk.datasets.make_loader(task.source_x, task.source_y, batch_size=64, seed=seed)
    )
    target = tk.datasets.infinite(
        tk.datasets.make_loader(task.target_x, batch_size=64, seed=seed + 1)
    )
    for _ in range(300):
        (xs, ys), (xt,) = next(source), next(target)
        loss = step_loss(xs, ys, xt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        predictions = net(task.target_test_x).argmax(1)
    return float((predictions == task.target_test_y).float().mean())


# ----------------------------------------------------------------- MCC, BNM, AFN


def ref_mcc(z: np.ndarray, temperature: float, weights_from: np.ndarray | None = None) -> float:
    """Minimum class confusion written out from Jin et al. (2020), eq. 1-6, in float64.

    ``weights_from`` computes the entropy weights from other logits (the weights are a
    constant of the loss: the library detaches them).
    """
    batch, classes = z.shape
    p = softmax(z / temperature, axis=1)
    q = p if weights_from is None else softmax(weights_from / temperature, axis=1)
    entropy_ = entr(q).sum(axis=1)  # -q log q, 0 at q = 0
    w = 1.0 + np.exp(-entropy_)
    w = batch * w / w.sum()
    confusion = np.zeros((classes, classes))
    for i in range(batch):
        confusion += w[i] * np.outer(p[i], p[i])
    normalised = confusion / confusion.sum(axis=0, keepdims=True)
    return float((normalised.sum() - np.trace(normalised)) / classes)


def ref_bnm(z: np.ndarray) -> float:
    """-||softmax(z)||_* / B (Cui et al. 2020), nuclear norm from NumPy's SVD."""
    return -float(np.linalg.norm(softmax(z, axis=1), "nuc")) / z.shape[0]


def numeric_gradient(fn: Callable[[np.ndarray], float], x: np.ndarray) -> np.ndarray:
    """Central finite differences in float64."""
    grad = np.zeros_like(x)
    eps = 1e-6
    for index in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (fn(up) - fn(down)) / (2 * eps)
    return grad


logit_batches = arrays(
    np.float64,
    st.tuples(st.integers(2, 10), st.integers(2, 6)),
    elements=st.floats(-20, 20, allow_nan=False, width=64),
)


# ----------------------------------------------------------------- extreme magnitudes

MAGNITUDES = {"1e20": (1e20, 1e20), "1e-20": (1e-20, 1e-20), "mixed": (1.0, 1e20)}


def fp32_sample(magnitude: str, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    s, t = sample(n, m, d=4, seed=5)
    sx, sy = MAGNITUDES[magnitude]
    return (
        (s * sx).astype(np.float32).astype(np.float64),
        (t * sy).astype(np.float32).astype(np.float64),
    )


def max_gram(name: str, s: np.ndarray, t: np.ndarray) -> float:
    z = np.concatenate([s, t])
    return float(np.abs(ref_gram(name, z, z, pooled_mean_sqdist(s, t))).max())


# ----------------------------------------------------------------- target regularisers end to end

Regulariser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BottleneckNet(nn.Module):
    """MLP body with a BatchNorm bottleneck (as in the AFN/MDD papers) and a linear head."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.body(x))
        return out


def target_accuracy(
    task: tk.datasets.DomainTask, regulariser: Regulariser | None, seed: int, bottleneck: bool
) -> float:
    """Source cross-entropy (+ a target regulariser) for 300 steps; target test accuracy.

    ``regulariser(source_features, target_features, target_logits)``. The plain MLP is
    trained with Adam, the BatchNorm-bottleneck network with SGD + momentum.
    """
    tk.seed_everything(seed)
    dim = task.source_x.shape[1]
    net: nn.Module
    if bottleneck:
        net = BottleneckNet(dim, task.num_classes)
        optimizer: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    else:
        net = tk.models.MLP(dim, task.num_classes, hidden=(64, 64))
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step_loss(xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        features = net.forward_features(torch.cat([xs, xt]))  # type: ignore[operator]
        fs, ft = features[: len(xs)], features[len(xs) :]
        loss = nn.functional.cross_entropy(net.fc(fs), ys)  # type: ignore[operator]
        if regulariser is not None:
            loss = loss + regulariser(fs, ft, net.fc(ft))  # type: ignore[operator]
        return loss

    return fit_and_score(task, net, optimizer, step_loss, seed=seed)

"""``torch.compile(fullgraph=True)`` traces the losses and the GRL without graph breaks."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

import transferkit as tk

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_compiles(fn: Loss, source: torch.Tensor, target: torch.Tensor) -> None:
    """Compiled value and input gradient equal the eager ones (fullgraph: no break)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s_c = source.clone().requires_grad_(True)
    s_e = source.clone().requires_grad_(True)
    value = compiled(s_c, target)
    value.backward()
    reference = fn(s_e, target)
    reference.backward()
    torch.testing.assert_close(value.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    assert s_c.grad is not None and s_e.grad is not None
    torch.testing.assert_close(s_c.grad, s_e.grad, rtol=1e-5, atol=1e-6)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen) + 0.5


@pytest.mark.parametrize("estimator", ["unbiased", "biased", "linear"])
@pytest.mark.parametrize("bandwidth", [None, 1.5])
def test_mmd_compiles_without_graph_breaks(estimator: str, bandwidth: float | None) -> None:
    kernel = tk.kernels.GaussianKernel(bandwidth=bandwidth)
    source, target = _batch()

    def loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return tk.losses.mmd(s, t, kernel, estimator)  # type: ignore[arg-type]

    _check_compiles(loss, source, target)


@pytest.mark.parametrize(
    "loss",
    [
        pytest.param(tk.losses.coral, id="coral"),
        pytest.param(lambda s, t: tk.losses.entropy(s), id="entropy"),
        pytest.param(lambda s, t: tk.losses.distillation(s, t), id="distillation"),
        pytest.param(
            lambda s, t: tk.losses.mmd(s, t, tk.kernels.LinearKernel()), id="mmd-linear-kernel"
        ),
        pytest.param(lambda s, t: (tk.GradientReversal(0.5)(s) * t).sum(), id="GradientReversal"),
        pytest.param(lambda s, t: tk.losses.mcc(s), id="mcc"),
        pytest.param(lambda s, t: tk.losses.bnm(s), id="bnm"),
        pytest.param(lambda s, t: tk.losses.adaptive_feature_norm(s), id="safn"),
        pytest.param(lambda s, t: tk.losses.adaptive_feature_norm(s, radius=2.0), id="hafn"),
    ],
)
def test_losses_and_grl_compile_without_graph_breaks(loss: Loss) -> None:
    source, target = _batch()
    _check_compiles(loss, source, target)


def test_validation_still_rejects_nan_outside_compile() -> None:
    source, target = _batch()
    source[0, 0] = float("nan")
    with pytest.raises(ValueError, match="source"):
        tk.losses.mmd(source, target)
    with pytest.raises(ValueError, match="source"):
        tk.losses.coral(source, target)
    with pytest.raises(ValueError, match="target_logits"):
        tk.losses.mcc(source)


def test_scheduled_reversal_between_separately_compiled_parts_compiles_once() -> None:
    # The pattern GradientReversal's docstring recommends with a WarmStartSchedule: the
    # discriminator compiled alone, the reversal (whose coefficient changes every step)
    # in eager between, so the ramp never recompiles anything; gradients follow the ramp.
    torch._dynamo.reset()
    counters.clear()
    schedule = tk.WarmStartSchedule(max_steps=10)
    criterion = tk.DomainAdversarialLoss(
        tk.DomainDiscriminator(4, hidden=8, dropout=0.0), grl=tk.GradientReversal(schedule)
    )
    eager = copy.deepcopy(criterion)
    criterion.discriminator = torch.compile(criterion.discriminator, backend="eager")
    for _ in range(10):
        x = torch.randn(6, 4)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        criterion(a[:3], a[3:]).backward()
        eager(b[:3], b[3:]).backward()
        torch.testing.assert_close(a.grad, b.grad)
        schedule.step()
        eager.grl.schedule.step()
    assert counters["stats"]["unique_graphs"] == 1

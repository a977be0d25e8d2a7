"""grad_reverse and GradientReversal: identity forward, -coeff * grad backward."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import transferkit as tk


def test_grad_reverse_forward_is_identity_and_keeps_dtype() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(4, 5).to(dtype)
        out = tk.grad_reverse(x, coeff=3.0)
        assert out.dtype == dtype
        assert torch.equal(out, x)


@pytest.mark.parametrize("coeff", [0.0, 0.3, 1.0, 2.5])
def test_grad_reverse_backward_is_exactly_minus_coeff_times_grad(coeff: float) -> None:
    x = torch.randn(6, 3, requires_grad=True)
    upstream = torch.randn(6, 3)
    tk.grad_reverse(x, coeff).backward(upstream)
    assert torch.equal(x.grad, -coeff * upstream)


def test_gradient_reversal_module_uses_schedule_value_in_backward() -> None:
    schedule = tk.WarmStartSchedule(max_steps=20, alpha=10.0)
    grl = tk.GradientReversal(schedule)
    for _ in range(7):
        schedule.step()
    assert grl.coeff == schedule.value
    x = torch.randn(5, 2, requires_grad=True)
    upstream = torch.randn(5, 2)
    grl(x).backward(upstream)
    assert torch.equal(x.grad, -schedule.value * upstream)
    assert 0.0 < schedule.value < 1.0


def test_grad_reverse_under_cpu_autocast_keeps_reversal() -> None:
    layer = nn.Linear(4, 3)
    x = torch.randn(8, 4, requires_grad=True)
    with tk.autocast("cpu", dtype=torch.bfloat16):
        hidden = layer(x)
        reversed_ = tk.grad_reverse(hidden, 2.0)
    assert reversed_.dtype == torch.bfloat16
    upstream = torch.randn(8, 3, dtype=torch.bfloat16)
    reversed_.backward(upstream)
    x_ref = x.detach().clone().requires_grad_(True)
    with tk.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x_ref)
    plain.backward(upstream)
    assert torch.equal(x.grad, -2.0 * x_ref.grad)


def test_grad_reverse_supports_double_backward() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((tk.grad_reverse(x, 0.7) ** 2).sum(), x, create_graph=True)
    torch.testing.assert_close(grad, -0.7 * 2.0 * x)
    # grad = -0.7 * 2 * grad_reverse(x): differentiating it crosses the reversal once more
    (second,) = torch.autograd.grad(grad.sum(), x)
    torch.testing.assert_close(second, torch.full_like(x, (-0.7) * 2.0 * (-0.7)))


def test_grad_reverse_traces_with_torch_compile_fullgraph() -> None:
    def step(x: torch.Tensor) -> torch.Tensor:
        return (tk.grad_reverse(x * 2.0, 0.5) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, requires_grad=True)
    compiled(x).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    step(x_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(x.grad, -0.5 * 2.0 * 2.0 * (2.0 * x.detach()))


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: tk.grad_reverse(torch.ones(2), -1.0), ValueError),
        (lambda: tk.grad_reverse(torch.ones(2), float("nan")), ValueError),
        (lambda: tk.grad_reverse(torch.ones(2, dtype=torch.int64), 1.0), TypeError),
        (lambda: tk.grad_reverse([1.0, 2.0], 1.0), TypeError),
        (lambda: tk.GradientReversal("linear"), TypeError),
        (lambda: tk.GradientReversal(-0.5), ValueError),
    ],
)
def test_reversal_rejects_bad_arguments(call, error) -> None:
    with pytest.raises(error):
        call()


def test_gradient_reversal_state_dict_carries_schedule_step() -> None:
    criterion = tk.DomainAdversarialLoss(
        tk.DomainDiscriminator(4, hidden=8), grl=tk.GradientReversal(tk.WarmStartSchedule(50))
    )
    for _ in range(12):
        criterion.grl.schedule.step()
    buffer = io.BytesIO()
    torch.save(criterion.state_dict(), buffer)
    buffer.seek(0)
    fresh = tk.DomainAdversarialLoss(
        tk.DomainDiscriminator(4, hidden=8), grl=tk.GradientReversal(tk.WarmStartSchedule(50))
    )
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.grl.schedule.step_count == 12
    assert fresh.grl.coeff == criterion.grl.coeff


def test_gradient_reversal_state_dict_refuses_schedule_into_fixed_coeff() -> None:
    scheduled = tk.GradientReversal(tk.WarmStartSchedule(10))
    with pytest.raises(ValueError, match="schedule"):
        tk.GradientReversal(1.0).load_state_dict(scheduled.state_dict())


def test_gradient_reversal_used_twice_in_a_step_reverses_both_with_the_same_coefficient() -> None:
    # Guard: the layer never advances its schedule itself (not in forward, backward,
    # eval() or under no_grad), so DANN on two target batches per step, or an
    # evaluation pass in between, leaves the ramp where the training loop put it.
    schedule = tk.WarmStartSchedule(max_steps=10)
    schedule.step()
    schedule.step()
    grl = tk.GradientReversal(schedule)
    coeff = schedule.value
    first = torch.randn(3, 2, requires_grad=True)
    second = torch.randn(4, 2, requires_grad=True)
    (grl(first).sum() + 2.0 * grl(second).sum()).backward()
    grl.eval()
    with torch.no_grad():
        grl(torch.randn(3, 2))
    grl.train()
    assert schedule.step_count == 2 and grl.coeff == coeff
    assert torch.equal(first.grad, torch.full((3, 2), -coeff))
    assert torch.equal(second.grad, torch.full((4, 2), -2.0 * coeff))

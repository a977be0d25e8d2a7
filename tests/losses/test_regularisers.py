"""Tests of transferkit/losses/_regularisers.py: AFN, BSS and L2-SP."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from transferkit import losses as L

from .references import (
    FP32_MAX,
    TwoLayer,
    assert_bf16_close_to_fp32,
    assert_gradcheck_on_two_batches,
    finite_rows,
    numeric_gradient,
)


def test_bss_is_the_sum_of_the_k_smallest_squared_singular_values() -> None:
    f = np.random.default_rng(9).normal(size=(12, 5))
    sv = np.linalg.svd(f, compute_uv=False)
    for k in (1, 3, 5):
        expected = np.sort(sv**2)[:k].sum()
        np.testing.assert_allclose(float(L.bss(torch.from_numpy(f), k=k)), expected, rtol=1e-6)


def test_l2sp_penalises_distance_to_anchor_and_decays_excluded() -> None:
    torch.manual_seed(0)
    net = TwoLayer()
    reg = L.L2SP(net, alpha=0.3, beta=0.2, exclude=["fc"])
    assert reg.anchored == ["body.weight", "body.bias"]
    assert reg.excluded == ["fc.weight", "fc.bias"]
    anchors = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    params = dict(net.named_parameters())
    expected = 0.15 * sum(((params[n] - anchors[n]) ** 2).sum() for n in reg.anchored)
    expected = expected + 0.1 * sum((params[n] ** 2).sum() for n in reg.excluded)
    torch.testing.assert_close(reg(), expected)
    reg().backward()
    assert net.frozen.weight.grad is None and net.body.weight.grad is not None


def test_l2sp_anchors_save_and_load_with_state_dict() -> None:
    torch.manual_seed(0)
    net = TwoLayer()
    reg = L.L2SP(net, exclude=["fc.*"])
    state = reg.state_dict()
    assert set(state) == {"body__weight", "body__bias"}
    other = L.L2SP(TwoLayer(), exclude=["fc.*"])
    other.load_state_dict(state)
    torch.testing.assert_close(other.body__weight, net.body.weight.detach())


def test_l2sp_follows_the_model_to_another_dtype() -> None:
    net = TwoLayer()
    reg = L.L2SP(net)
    net.double()
    reg.double()
    value = reg()
    assert value.dtype == torch.float64 and value.item() == 0.0


def test_l2sp_rejects_unknown_exclude_patterns_and_negative_strength() -> None:
    with pytest.raises(ValueError, match="matches no trainable"):
        L.L2SP(TwoLayer(), exclude=["head*"])
    with pytest.raises(ValueError, match="alpha"):
        L.L2SP(TwoLayer(), alpha=-1.0)


def test_l2sp_keeps_the_model_out_of_its_parameters() -> None:
    reg = L.L2SP(TwoLayer())
    assert list(reg.parameters()) == []


@pytest.mark.parametrize("new_outputs", [5, 3])
def test_l2sp_refuses_a_head_whose_shape_changed(new_outputs: int) -> None:
    # A 1-output head replaced by a 5-output one used to broadcast its (1, 3) anchor
    # against the (5, 3) weight and return a number; other shapes failed with torch's
    # broadcasting RuntimeError that named no parameter.
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1 if new_outputs == 5 else 7))
    reg = L.L2SP(net)
    net[1] = nn.Linear(3, new_outputs)
    with pytest.raises(ValueError, match=r"'1.weight' has shape .* but its anchor"):
        reg()


def test_l2sp_refuses_a_parameter_unfrozen_after_construction_without_an_anchor() -> None:
    # Freeze, build L2SP, unfreeze (as GradualUnfreezing does): the unfrozen layer used
    # to be silently left out, so its drift from the pretrained weights cost nothing.
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[0].requires_grad_(False)
    reg = L.L2SP(net, alpha=1.0, beta=0.5)
    assert float(reg().detach()) == 0.0  # still frozen: nothing to regularise
    net[0].requires_grad_(True)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are trainable but"):
        reg()


def test_l2sp_decays_a_late_unfrozen_parameter_that_matches_exclude() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[1].requires_grad_(False)
    reg = L.L2SP(net, alpha=1.0, beta=0.5, exclude=["*bias"])
    assert reg.anchored == ["0.weight"] and reg.excluded == ["0.bias"]
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].bias.requires_grad_(True)
    biases = sum(float((b.detach() ** 2).sum()) for b in (net[0].bias, net[1].bias))
    assert float(reg().detach()) == pytest.approx(0.5 * 12.0 + 0.25 * biases)
    net[1].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['1.weight'\] are trainable but"):
        reg()


def test_safn_value_is_delta_squared_and_gradient_grows_every_norm() -> None:
    rng = np.random.default_rng(8)
    f = rng.normal(size=(6, 4))
    features = torch.from_numpy(f).requires_grad_(True)
    value = L.adaptive_feature_norm(features, delta=0.7)
    assert float(value) == pytest.approx(0.49, abs=1e-12)
    value.backward()
    assert features.grad is not None
    # d/df of mean((sg(h) + delta - h)^2) = -2 delta / N * f / ||f||, from the paper's eq. 3
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    np.testing.assert_allclose(features.grad.numpy(), -2 * 0.7 / 6 * f / norms, rtol=1e-10)
    stepped = features.detach() - 0.1 * features.grad
    assert bool((stepped.norm(dim=1) > features.detach().norm(dim=1)).all())


def test_hafn_matches_numpy_reference_and_gradcheck_float64() -> None:
    f = np.random.default_rng(9).normal(size=(5, 3)) * 4.0

    def ref(x: np.ndarray) -> float:
        return float((np.linalg.norm(x, axis=1).mean() - 3.0) ** 2)

    features = torch.from_numpy(f).requires_grad_(True)
    value = L.adaptive_feature_norm(features, radius=3.0)
    np.testing.assert_allclose(float(value), ref(f), rtol=1e-12)
    value.backward()
    assert features.grad is not None
    np.testing.assert_allclose(features.grad.numpy(), numeric_gradient(ref, f), rtol=1e-5)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: L.adaptive_feature_norm(t, radius=2.0), (x,))
    module = L.AdaptiveFeatureNormLoss(radius=3.0)
    assert float(module(torch.from_numpy(f))) == pytest.approx(ref(f))
    assert repr(module) == "AdaptiveFeatureNormLoss(radius=3)"


def test_afn_has_a_zero_gradient_at_zero_features() -> None:
    for options in ({"delta": 1.0}, {"radius": 2.0}):
        features = torch.zeros(3, 4, requires_grad=True)
        L.adaptive_feature_norm(features, **options).backward()  # type: ignore[arg-type]
        assert features.grad is not None and bool(torch.isfinite(features.grad).all())


@given(f=finite_rows, radius=st.floats(0.1, 10.0), delta=st.floats(0.01, 5.0))
def test_afn_values(f: np.ndarray, radius: float, delta: float) -> None:
    features = torch.from_numpy(f)
    assert float(L.adaptive_feature_norm(features, delta=delta)) == pytest.approx(delta**2)
    assert float(L.adaptive_feature_norm(features, radius=radius)) >= 0.0
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    if bool((norms > 1e-3).all()):
        on_sphere = torch.from_numpy(f / norms * radius)
        assert float(L.adaptive_feature_norm(on_sphere, radius=radius)) < 1e-12 * radius**2


def test_l2sp_rejects_non_string_exclude_patterns() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    for bad in ([1], 1, [None], ["1.*", 2.0]):
        with pytest.raises(TypeError, match="exclude: expected a glob pattern"):
            L.L2SP(net, exclude=bad)  # type: ignore[arg-type]


def test_hard_afn_moves_the_mean_feature_norm_to_the_radius() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 16)
    x = torch.randn(64, 8)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    start = float(layer(x).norm(dim=1).mean())
    for _ in range(200):
        optimizer.zero_grad()
        L.adaptive_feature_norm(layer(x), radius=10.0).backward()
        optimizer.step()
    assert start < 5.0 and float(layer(x).norm(dim=1).mean()) == pytest.approx(10.0, rel=1e-3)


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_afn_at_extreme_magnitudes_matches_float64_or_raises_clearly(scale: float) -> None:
    # fp32 norms of 1e20 rows used to overflow to inf (NaN loss), 1e-20 rows to underflow,
    # and sg(h) + delta - h rounded to 0 at h ~ 1e20.
    f = (np.random.default_rng(12).normal(size=(6, 4)) * scale).astype(np.float32)
    f64 = f.astype(np.float64)
    norms = np.linalg.norm(f64, axis=1, keepdims=True)
    features = torch.from_numpy(f).requires_grad_(True)
    value = L.adaptive_feature_norm(features, delta=0.5)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.25, rel=1e-6)
    assert features.grad is not None
    np.testing.assert_allclose(features.grad.numpy(), -2 * 0.5 / 6 * f64 / norms, rtol=1e-5)
    hard_expected = float((norms.mean() - 3.0) ** 2)
    if hard_expected >= FP32_MAX:
        with pytest.raises(ValueError, match="features: the hard AFN penalty .* overflows"):
            L.adaptive_feature_norm(torch.from_numpy(f), radius=3.0)
        return
    hard = L.adaptive_feature_norm(torch.from_numpy(f), radius=3.0)
    assert float(hard) == pytest.approx(hard_expected, rel=1e-5)


@pytest.mark.parametrize(
    "loss",
    [lambda a, b: L.bss(a, k=2) + L.bss(b)],
    ids=["bss"],
)
def test_other_losses_gradcheck_float64(loss: Callable[..., torch.Tensor]) -> None:
    assert_gradcheck_on_two_batches(loss)


def test_other_losses_under_bf16_autocast_stay_close_to_fp32() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(32, 8, generator=gen)
    pairs = [(lambda x: L.bss(x, k=2), (a,))]
    for fn, args in pairs:
        assert_bf16_close_to_fp32(fn, *args)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: L.bss(torch.randn(4, 3), k=4), ValueError, "at most"),
        (lambda: L.bss(torch.randn(4, 3), k=0), ValueError, "k"),
    ],
)
def test_bad_input_raises_a_clear_error(
    call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_l2sp_refuses_a_model_moved_after_construction_until_it_follows() -> None:
    # Guard: anchors stay where L2SP was built; a model moved alone (here to the meta
    # device, which every machine has) is refused with the remedy, not computed against
    # anchors on another device.
    net = TwoLayer()
    reg = L.L2SP(net)
    net.to("meta")
    with pytest.raises(ValueError, match=r"anchor is on cpu; move the loss module too"):
        reg()
    reg.to("meta")
    assert reg().device.type == "meta"


def test_l2sp_gradient_is_alpha_times_drift_and_beta_times_excluded_weight() -> None:
    # Analytic float64 gradient (L2SP has no tensor inputs for gradcheck): d/dw of
    # alpha/2 ||w - w0||^2 is alpha (w - w0); of beta/2 ||w||^2 it is beta w.
    torch.manual_seed(0)
    net = TwoLayer().double()
    reg = L.L2SP(net, alpha=0.3, beta=0.2, exclude=["fc"])
    anchors = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    reg().backward()
    for name, param in net.named_parameters():
        if name in reg.anchored:
            expected = 0.3 * (param.detach() - anchors[name])
        elif name in reg.excluded:
            expected = 0.2 * param.detach()
        else:
            assert param.grad is None
            continue
        torch.testing.assert_close(param.grad, expected, rtol=1e-12, atol=1e-15)

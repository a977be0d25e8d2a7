"""DomainAdversarialLoss (DANN) and ConditionalDomainAdversarialLoss (CDAN/CDAN+E)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk
from transferkit.adversarial import RANDOMIZE_ABOVE


def numpy_domain_bce(z_s: np.ndarray, z_t: np.ndarray, w_s=None, w_t=None) -> float:
    """Balanced binary cross-entropy, source label 1 and target label 0, in NumPy."""
    w_s = np.ones_like(z_s) if w_s is None else w_s
    w_t = np.ones_like(z_t) if w_t is None else w_t
    loss_s = np.mean(w_s * np.logaddexp(0.0, -z_s))  # -log sigmoid(z)
    loss_t = np.mean(w_t * np.logaddexp(0.0, z_t))  # -log(1 - sigmoid(z))
    return float(0.5 * (loss_s + loss_t))


def linear_discriminator(in_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, 1)


def undo_reversal(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """Pre-reverse by 1/coeff so that the loss's own reversal gives the true gradient.

    gradcheck compares analytic and numeric gradients; a GRL deliberately breaks that
    equality, so composing with an inverse reversal checks everything else exactly.
    """
    return tk.grad_reverse(x, 1.0 / coeff)


def test_domain_adversarial_loss_matches_numpy_reference_with_unequal_batches_and_weights() -> None:
    disc = linear_discriminator(5)
    criterion = tk.DomainAdversarialLoss(disc)
    source, target = torch.randn(7, 5), torch.randn(4, 5) + 0.5
    w_s, w_t = torch.rand(7) * 2, torch.rand(4) * 2
    loss = criterion(source, target, source_weights=w_s, target_weights=w_t)
    with torch.no_grad():
        z_s, z_t = disc(source).squeeze(1).numpy(), disc(target).squeeze(1).numpy()
    expected = numpy_domain_bce(
        z_s.astype(np.float64), z_t.astype(np.float64), w_s.numpy(), w_t.numpy()
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    accuracy = 0.5 * (np.mean(z_s > 0) + np.mean(z_t <= 0))
    assert criterion.domain_accuracy == pytest.approx(accuracy)


def test_domain_adversarial_loss_reverses_feature_gradient_but_not_discriminator_gradient() -> None:
    disc = linear_discriminator(3)
    coeff = 0.4
    criterion = tk.DomainAdversarialLoss(disc, grl=tk.GradientReversal(coeff))
    source = torch.randn(6, 3, requires_grad=True)
    target = torch.randn(5, 3, requires_grad=True)
    criterion(source, target).backward()
    grad_disc = disc.weight.grad.clone()

    reference = linear_discriminator(3)
    src, tgt = source.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    z_s, z_t = reference(src).squeeze(1), reference(tgt).squeeze(1)
    plain = 0.5 * (nn.functional.softplus(-z_s).mean() + nn.functional.softplus(z_t).mean())
    plain.backward()
    torch.testing.assert_close(source.grad, -coeff * src.grad)
    torch.testing.assert_close(target.grad, -coeff * tgt.grad)
    torch.testing.assert_close(grad_disc, reference.weight.grad)


def test_domain_adversarial_loss_averages_each_domain_separately() -> None:
    criterion = tk.DomainAdversarialLoss(tk.DomainDiscriminator(4, hidden=8)).eval()
    source, target = torch.randn(5, 4), torch.randn(3, 4)
    once = criterion(source, target)
    twice = criterion(torch.cat([source, source, source]), target)
    torch.testing.assert_close(once, twice)


def test_domain_accuracy_is_nan_before_any_call() -> None:
    criterion = tk.DomainAdversarialLoss(tk.DomainDiscriminator(4, hidden=8))
    assert math.isnan(criterion.domain_accuracy)
    criterion(torch.randn(3, 4), torch.randn(2, 4))
    assert isinstance(criterion.domain_accuracy, float)


def test_domain_adversarial_loss_gradcheck_float64() -> None:
    torch.manual_seed(0)
    criterion = tk.DomainAdversarialLoss(
        tk.DomainDiscriminator(3, hidden=5, dropout=0.0), grl=tk.GradientReversal(0.7)
    ).double()
    source = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, t, w: criterion(undo_reversal(s, 0.7), undo_reversal(t, 0.7), source_weights=w),
        (source, target, weights),
    )


def test_domain_adversarial_loss_under_bf16_autocast_is_fp32_and_close() -> None:
    torch.manual_seed(0)
    criterion = tk.DomainAdversarialLoss(tk.DomainDiscriminator(16, hidden=32)).eval()
    source, target = torch.randn(32, 16), torch.randn(24, 16) + 0.3
    exact = criterion(source, target)
    with tk.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(source, target)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=0.01)


BAD_DANN_CALLS = [
    ("source", lambda: (torch.randn(4), torch.randn(3, 4)), {}, ValueError),
    ("target", lambda: (torch.randn(4, 4), torch.randn(3, 5)), {}, ValueError),
    ("source", lambda: (torch.full((4, 4), float("nan")), torch.randn(3, 4)), {}, ValueError),
    ("target", lambda: (torch.randn(4, 4), torch.zeros(0, 4)), {}, ValueError),
    ("source", lambda: (torch.ones(4, 4, dtype=torch.int64), torch.randn(3, 4)), {}, TypeError),
    ("dtype", lambda: (torch.randn(4, 4), torch.randn(3, 4).double()), {}, TypeError),
    ("source_weights", lambda: (torch.randn(4, 4), torch.randn(3, 4)), {"n": 3}, ValueError),
    ("source_weights", lambda: (torch.randn(4, 4), torch.randn(3, 4)), {"neg": 1}, ValueError),
]


@pytest.mark.parametrize(("name", "make", "opts", "error"), BAD_DANN_CALLS)
def test_domain_adversarial_loss_rejects_bad_input(name, make, opts, error) -> None:
    criterion = tk.DomainAdversarialLoss(tk.DomainDiscriminator(4, hidden=8))
    source, target = make()
    kwargs = {}
    if "n" in opts:
        kwargs["source_weights"] = torch.ones(opts["n"])
    if "neg" in opts:
        kwargs["source_weights"] = -torch.ones(4)
    with pytest.raises(error, match=name):
        criterion(source, target, **kwargs)


def test_domain_adversarial_loss_rejects_non_module_and_wrong_grl() -> None:
    with pytest.raises(TypeError, match="discriminator"):
        tk.DomainAdversarialLoss(lambda x: x)
    with pytest.raises(TypeError, match="grl"):
        tk.DomainAdversarialLoss(nn.Linear(3, 1), grl=tk.WarmStartSchedule(10))


def test_domain_adversarial_loss_rejects_discriminator_with_several_outputs() -> None:
    criterion = tk.DomainAdversarialLoss(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="one logit"):
        criterion(torch.randn(4, 3), torch.randn(4, 3))


def numpy_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def test_cdan_multilinear_map_is_flattened_outer_product() -> None:
    criterion = tk.ConditionalDomainAdversarialLoss(nn.Linear(12, 1), num_classes=3, feature_dim=4)
    features, probs = torch.randn(5, 4), torch.rand(5, 3)
    mapped = criterion.multilinear_map(features, probs).numpy()
    expected = np.einsum("nc,nf->ncf", probs.numpy(), features.numpy()).reshape(5, 12)
    np.testing.assert_allclose(mapped, expected, rtol=1e-6)


def test_cdan_randomized_map_matches_numpy_and_its_matrices_are_buffers() -> None:
    criterion = tk.ConditionalDomainAdversarialLoss(
        nn.Linear(64, 1), num_classes=3, feature_dim=4, randomized=True, randomized_dim=64
    )
    buffers = dict(criterion.named_buffers())
    assert set(buffers) >= {"random_features", "random_classes"}
    assert {"random_features", "random_classes"} <= set(criterion.state_dict())
    features, probs = torch.randn(5, 4), torch.rand(5, 3)
    mapped = criterion.multilinear_map(features, probs).numpy()
    r_f, r_g = criterion.random_features.numpy(), criterion.random_classes.numpy()
    expected = (features.numpy() @ r_f) * (probs.numpy() @ r_g) / math.sqrt(64)
    np.testing.assert_allclose(mapped, expected, rtol=1e-5, atol=1e-6)


def test_cdan_randomizes_automatically_only_above_threshold() -> None:
    small = tk.ConditionalDomainAdversarialLoss(nn.Linear(1, 1), num_classes=4, feature_dim=1024)
    large = tk.ConditionalDomainAdversarialLoss(nn.Linear(1, 1), num_classes=5, feature_dim=1024)
    assert 4 * 1024 <= RANDOMIZE_ABOVE < 5 * 1024
    assert not small.randomized and small.random_features is None
    assert large.randomized and large.random_features.shape == (1024, 1024)
    with pytest.raises(ValueError, match="num_classes"):
        tk.ConditionalDomainAdversarialLoss(nn.Linear(1, 1), randomized=True)


def test_cdan_state_dict_round_trips_random_matrices() -> None:
    def make(seed: int) -> tk.ConditionalDomainAdversarialLoss:
        torch.manual_seed(seed)
        return tk.ConditionalDomainAdversarialLoss(
            tk.DomainDiscriminator(32, hidden=8),
            num_classes=3,
            feature_dim=6,
            randomized=True,
            randomized_dim=32,
            seed=seed,
        ).eval()

    saved, other = make(0), make(1)
    assert not torch.equal(saved.random_features, other.random_features)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(saved.random_features, other.random_features)
    assert torch.equal(saved.random_classes, other.random_classes)
    args = (torch.randn(4, 3), torch.randn(4, 6), torch.randn(5, 3), torch.randn(5, 6))
    torch.testing.assert_close(saved(*args), other(*args))


def test_cdan_entropy_conditioning_matches_numpy_reference() -> None:
    disc = linear_discriminator(4 * 3)
    criterion = tk.ConditionalDomainAdversarialLoss(
        disc, num_classes=3, feature_dim=4, entropy_conditioning=True
    )
    g_s, f_s, g_t, f_t = (
        torch.randn(6, 3) * 2,
        torch.randn(6, 4),
        torch.randn(4, 3),
        torch.randn(4, 4),
    )
    loss = criterion(g_s, f_s, g_t, f_t)

    weight, bias = disc.weight.detach().numpy()[0], float(disc.bias.detach())

    def domain(g: torch.Tensor, f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        p = numpy_softmax(g.numpy().astype(np.float64))
        h = np.einsum("nc,nf->ncf", p, f.numpy()).reshape(len(p), -1)
        entropy = -(p * np.log(p)).sum(axis=1)
        w = 1.0 + np.exp(-entropy)
        return h @ weight + bias, w / w.mean()

    z_s, w_s = domain(g_s, f_s)
    z_t, w_t = domain(g_t, f_t)
    assert loss.item() == pytest.approx(numpy_domain_bce(z_s, z_t, w_s, w_t), rel=1e-5)


def test_cdan_passes_gradient_through_features_only() -> None:
    criterion = tk.ConditionalDomainAdversarialLoss(
        tk.DomainDiscriminator(8, hidden=8), num_classes=2, feature_dim=4
    )
    g_s = torch.randn(5, 2, requires_grad=True)
    f_s = torch.randn(5, 4, requires_grad=True)
    criterion(g_s, f_s, torch.randn(3, 2), torch.randn(3, 4)).backward()
    assert g_s.grad is None
    assert f_s.grad.abs().sum() > 0


@pytest.mark.parametrize("randomized", [False, True])
def test_cdan_gradcheck_float64(randomized: bool) -> None:
    torch.manual_seed(0)
    criterion = tk.ConditionalDomainAdversarialLoss(
        tk.DomainDiscriminator(8 if randomized else 6, hidden=5, dropout=0.0),
        num_classes=2,
        feature_dim=3,
        entropy_conditioning=True,
        randomized=randomized,
        randomized_dim=8,
        grl=tk.GradientReversal(0.5),
    ).double()
    g_s, g_t = torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    f_s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: criterion(g_s, undo_reversal(a, 0.5), g_t, undo_reversal(b, 0.5)), (f_s, f_t)
    )


def test_cdan_under_bf16_autocast_is_fp32_and_close() -> None:
    torch.manual_seed(0)
    criterion = tk.ConditionalDomainAdversarialLoss(
        tk.DomainDiscriminator(40, hidden=32),
        num_classes=4,
        feature_dim=10,
        entropy_conditioning=True,
    ).eval()
    args = (torch.randn(16, 4), torch.randn(16, 10), torch.randn(12, 4), torch.randn(12, 10))
    exact = criterion(*args)
    with tk.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(*args)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=0.01)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(4, 3), torch.randn(5, 6), torch.randn(3, 3), torch.randn(3, 6)), "source"),
        ((torch.randn(4, 2), torch.randn(4, 6), torch.randn(3, 2), torch.randn(3, 6)), "logits"),
        ((torch.randn(4, 3), torch.randn(4, 5), torch.randn(3, 3), torch.randn(3, 5)), "features"),
        ((torch.randn(4, 3), torch.randn(4, 6), torch.randn(3, 3), torch.randn(3)), "target"),
    ],
)
def test_cdan_rejects_inconsistent_input(args, match) -> None:
    criterion = tk.ConditionalDomainAdversarialLoss(nn.Linear(18, 1), num_classes=3, feature_dim=6)
    with pytest.raises(ValueError, match=match):
        criterion(*args)


@pytest.mark.cuda
def test_losses_run_on_cuda_with_unequal_batches() -> None:
    device = torch.device("cuda")
    dann = tk.DomainAdversarialLoss(tk.DomainDiscriminator(8, hidden=16)).to(device)
    loss = dann(torch.randn(6, 8, device=device), torch.randn(4, 8, device=device))
    loss.backward()
    cdan = tk.ConditionalDomainAdversarialLoss(
        tk.DomainDiscriminator(64, hidden=16),
        num_classes=4,
        feature_dim=8,
        randomized=True,
        randomized_dim=64,
        entropy_conditioning=True,
    ).to(device)
    args = [torch.randn(n, d, device=device) for n, d in ((6, 4), (6, 8), (4, 4), (4, 8))]
    with tk.autocast(device):
        out = cdan(*args)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    out.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_domain_adversarial_loss_accepts_half_and_double_features(dtype: torch.dtype) -> None:
    # An fp32 discriminator used to fail with a raw "mat1 and mat2 must have the same
    # dtype" on fp16/bf16/fp64 features; CDAN accepted half precision already.
    torch.manual_seed(0)
    criterion = tk.DomainAdversarialLoss(tk.DomainDiscriminator(6, hidden=16))
    criterion.eval()  # no dropout, fixed BatchNorm statistics: calls are comparable
    source = torch.randn(8, 6).to(dtype).requires_grad_(True)
    target = (torch.randn(5, 6) + 1).to(dtype).requires_grad_(True)
    loss = criterion(source, target)
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss))
    loss.backward()
    assert source.grad is not None and source.grad.dtype == dtype
    assert target.grad is not None and bool(torch.isfinite(target.grad.float()).all())
    assert all(p.grad is not None for p in criterion.parameters())
    # Same value as the fp32 computation on the same (rounded) features.
    reference = criterion(source.detach().float(), target.detach().float())
    torch.testing.assert_close(loss.detach(), reference, rtol=2e-2, atol=2e-2)
    # The reversed gradient reaches the features in their own dtype, with the fp32 value.
    s32 = source.detach().float().requires_grad_(True)
    criterion(s32, target.detach().float()).backward()
    torch.testing.assert_close(source.grad.float(), s32.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_conditional_adversarial_loss_accepts_half_and_double_features(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    criterion = tk.ConditionalDomainAdversarialLoss(
        tk.DomainDiscriminator(12, hidden=8), num_classes=3, feature_dim=4
    )
    features = torch.randn(5, 4).to(dtype).requires_grad_(True)
    loss = criterion(
        torch.randn(5, 3).to(dtype),
        features,
        torch.randn(4, 3).to(dtype),
        torch.randn(4, 4).to(dtype),
    )
    loss.backward()
    assert bool(torch.isfinite(loss)) and features.grad is not None
    assert features.grad.dtype == dtype


def test_cdan_features_dim_is_a_deprecated_spelling_of_feature_dim() -> None:
    # One name per concept: the feature width is ``feature_dim`` everywhere (SmallCNN, MLP).
    with pytest.warns(FutureWarning, match="feature_dim"):
        old = tk.ConditionalDomainAdversarialLoss(nn.Linear(1, 1), num_classes=5, features_dim=1024)
    new = tk.ConditionalDomainAdversarialLoss(nn.Linear(1, 1), num_classes=5, feature_dim=1024)
    assert old.feature_dim == new.feature_dim == 1024
    assert old.randomized and new.randomized
    with pytest.raises(TypeError, match="^features_dim: pass only feature_dim"):
        tk.ConditionalDomainAdversarialLoss(
            nn.Linear(1, 1), num_classes=5, feature_dim=8, features_dim=8
        )


def test_cdan_seed_fixes_the_random_map_without_touching_the_global_generator() -> None:
    disc = tk.DomainDiscriminator(16, hidden=8)

    def make(seed: int | None) -> tk.ConditionalDomainAdversarialLoss:
        return tk.ConditionalDomainAdversarialLoss(
            disc, num_classes=3, feature_dim=5, randomized=True, randomized_dim=16, seed=seed
        )

    torch.manual_seed(0)
    first = make(7)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())
    torch.manual_seed(123)
    second = make(7)
    assert first.random_features is not None and second.random_features is not None
    assert torch.equal(first.random_features, second.random_features)
    assert torch.equal(first.random_classes, second.random_classes)  # type: ignore[arg-type]
    assert not torch.equal(first.random_features, make(8).random_features)  # type: ignore[arg-type]
    torch.manual_seed(0)
    unseeded = make(None)  # the global generator: reproducible from torch.manual_seed
    torch.manual_seed(0)
    assert torch.equal(unseeded.random_features, make(None).random_features)  # type: ignore[arg-type]
    if torch.cuda.is_available():
        moved = make(7).cuda()
        assert moved.random_features is not None
        assert moved.random_features.device.type == "cuda"
        assert torch.equal(moved.random_features.cpu(), first.random_features)


def test_losses_leave_every_input_tensor_unchanged() -> None:
    # Guard across the losses, kernels and adversarial criteria: no call writes into the
    # caller's features, logits or weights (fp32 and fp16 inputs, with gradients on).
    from transferkit import kernels as K
    from transferkit import losses as L

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        s, t = torch.randn(6, 3, generator=gen), torch.randn(5, 3, generator=gen) + 1.0
        gs, gt = torch.randn(6, 4, generator=gen), torch.randn(5, 4, generator=gen)
        ws, wt = torch.rand(6, generator=gen) + 0.1, torch.rand(5, generator=gen) + 0.1
        inputs = [x.to(dtype).requires_grad_() for x in (s, t, gs, gt)]
        s, t, gs, gt = inputs
        snapshot = [x.detach().clone() for x in (s, t, gs, gt, ws, wt)]
        torch.manual_seed(0)
        dann = tk.DomainAdversarialLoss(tk.DomainDiscriminator(3, hidden=8))
        cdan = tk.ConditionalDomainAdversarialLoss(
            tk.DomainDiscriminator(8, hidden=8),
            num_classes=4,
            feature_dim=3,
            entropy_conditioning=True,
            randomized=True,
            randomized_dim=8,
            seed=0,
        )
        mdd = tk.MarginDisparityDiscrepancy(nn.Linear(3, 4))
        outputs = [
            L.mmd(s, t, source_weights=ws, target_weights=wt),
            L.mmd(s, t, K.LaplacianKernel(), "biased"),
            L.mmd(s[:5], t, K.PolynomialKernel(), "linear"),
            L.joint_mmd([s, gs], [t, gt], [K.GaussianKernel(), K.LinearKernel()]),
            L.coral(s, t),
            L.distillation(gs[:5], gt, 2.0),
            L.entropy(gs),
            L.mcc(gs),
            L.bnm(gs),
            L.adaptive_feature_norm(s),
            L.adaptive_feature_norm(s, radius=2.0),
            L.bss(s),
            K.GaussianKernel()(s, t).sum(),
            K.pairwise_squared_distances(s, t).sum(),
            dann(s, t, source_weights=ws, target_weights=wt),
            cdan(gs, s, gt, t, source_weights=ws, target_weights=wt),
            mdd(gs, s, gt, t),
            tk.grad_reverse(s, 0.5).sum(),
        ]
        torch.stack([o.float() for o in outputs]).sum().backward()
        for before, after in zip(snapshot, (s, t, gs, gt, ws, wt), strict=True):
            assert torch.equal(before, after.detach())

"""Pseudo-labels (`tk.PseudoLabeler`), FixMatch consistency and the augmentations."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import transferkit as tk
from transferkit.self_training import ramp_value

# --------------------------------------------------------------------------- PseudoLabeler


def test_threshold_selects_confident_predictions_only() -> None:
    labeler = tk.PseudoLabeler(3, threshold=0.8)
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.0, 0.21, 0.79]])
    pseudo = labeler(probs.clamp_min(1e-9).log())
    assert pseudo.labels.tolist() == [0, 0, 2, 2]
    assert pseudo.mask.tolist() == [True, False, True, False]
    torch.testing.assert_close(pseudo.confidence, probs.max(1).values, rtol=1e-5, atol=1e-6)
    assert pseudo.fraction == 0.5


def test_loss_is_masked_cross_entropy_averaged_over_the_whole_batch() -> None:
    labeler = tk.PseudoLabeler(4, threshold=0.6, max_weight=2.0)
    weak = torch.randn(10, 4) * 3
    strong = torch.randn(10, 4)
    pseudo = labeler(weak)
    expected = (
        2.0
        * (F.cross_entropy(strong, pseudo.labels, reduction="none") * pseudo.mask.float()).sum()
        / 10
    )
    torch.testing.assert_close(labeler.loss(strong, pseudo), expected)


def test_loss_is_float32_under_bfloat16_autocast() -> None:
    labeler = tk.PseudoLabeler(3, threshold=0.0)
    logits = torch.randn(6, 3)
    pseudo = labeler(logits)
    reference = labeler.loss(logits, pseudo)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = labeler.loss(logits.bfloat16(), pseudo)
    assert value.dtype == torch.float32
    assert math.isclose(float(value), float(reference), rel_tol=0.02)


def test_no_gradient_flows_through_the_pseudo_labels() -> None:
    logits = torch.randn(5, 3, requires_grad=True)
    labeler = tk.PseudoLabeler(3, threshold=0.0)
    pseudo = labeler(logits)
    assert not pseudo.confidence.requires_grad
    strong = torch.randn(5, 3, requires_grad=True)
    labeler.loss(strong, pseudo).backward()
    assert logits.grad is None and strong.grad is not None


def test_ramp_weight_rises_from_zero_to_max_weight() -> None:
    labeler = tk.PseudoLabeler(2, max_weight=3.0, rampup_steps=10, ramp="linear")
    weights = []
    for _ in range(12):
        weights.append(labeler.weight)
        labeler.step()
    assert weights[0] == 0.0
    assert weights[5] == pytest.approx(1.5)
    assert weights[10:] == [3.0, 3.0]
    assert all(a <= b for a, b in itertools.pairwise(weights))
    assert tk.PseudoLabeler(2, max_weight=3.0).weight == 3.0  # no ramp


@pytest.mark.parametrize("kind", ["sigmoid", "linear", "dann"])
def test_ramps_are_monotone_from_about_zero_to_one(kind: str) -> None:
    values = [ramp_value(p, kind) for p in np.linspace(0, 1, 21)]  # type: ignore[arg-type]
    assert values[0] < 0.01 and values[-1] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(values))


def test_class_thresholds_lower_the_threshold_of_rare_predictions() -> None:
    labeler = tk.PseudoLabeler(2, threshold=0.9, balance="class_threshold", momentum=0.0)
    # the network predicts class 0 mostly: class 1 gets a lower threshold
    logits = torch.tensor([[4.0, 0.0]] * 9 + [[0.0, 1.0]])
    labeler(logits)
    probs = logits.softmax(1).mean(0)
    expected = 0.9 * probs / probs.max()
    torch.testing.assert_close(labeler.thresholds, expected)
    assert labeler.thresholds[1] < labeler.thresholds[0] == pytest.approx(0.9)
    # a 0.8-confident class-1 prediction now passes; a class-0 one would not
    pseudo = labeler(torch.tensor([[0.0, math.log(4.0)], [math.log(4.0), 0.0]]), update=False)
    assert pseudo.mask.tolist() == [True, False]


def test_distribution_alignment_pulls_predictions_towards_the_prior() -> None:
    labeler = tk.PseudoLabeler(2, threshold=0.0, balance="distribution", momentum=0.0)
    logits = torch.tensor([[2.0, 0.0]] * 8 + [[0.0, 0.5]] * 2)
    pseudo = labeler(logits)
    probs = logits.softmax(1)
    aligned = probs * (0.5 / probs.mean(0))
    aligned = aligned / aligned.sum(1, keepdim=True)
    torch.testing.assert_close(pseudo.confidence, aligned.max(1).values)
    # the aligned class-1 share is larger than the raw one
    assert float(aligned[:, 1].mean()) > float(probs[:, 1].mean())


def test_update_false_leaves_the_class_statistics_alone() -> None:
    labeler = tk.PseudoLabeler(3, balance="distribution")
    before = labeler.class_mean.clone()
    labeler(torch.randn(4, 3), update=False)
    assert torch.equal(labeler.class_mean, before)
    labeler(torch.randn(4, 3))
    assert not torch.equal(labeler.class_mean, before)


def test_state_dict_round_trip_resumes_the_ramp_and_statistics() -> None:
    labeler = tk.PseudoLabeler(3, balance="class_threshold", rampup_steps=5)
    labeler(torch.randn(8, 3) * 3)
    labeler.step()
    labeler.step()
    other = tk.PseudoLabeler(3, balance="class_threshold", rampup_steps=5)
    other.load_state_dict(labeler.state_dict())
    assert other.weight == labeler.weight and other.steps == 2
    torch.testing.assert_close(other.thresholds, labeler.thresholds)


@given(
    st.lists(st.floats(-20, 20), min_size=4, max_size=40),
    st.floats(0.0, 1.0),
    st.sampled_from(["none", "class_threshold", "distribution"]),
)
def test_mask_agrees_with_confidence_and_labels_in_range(
    values: list[float], threshold: float, balance: str
) -> None:
    n = len(values) // 4
    logits = torch.tensor(values[: 4 * n]).view(n, 4)
    labeler = tk.PseudoLabeler(4, threshold=threshold, balance=balance)  # type: ignore[arg-type]
    pseudo = labeler(logits)
    assert pseudo.labels.dtype == torch.int64 and bool((pseudo.labels < 4).all())
    taus = labeler.thresholds[pseudo.labels]
    assert torch.equal(pseudo.mask, pseudo.confidence >= taus)
    assert bool((labeler.thresholds <= threshold + 1e-6).all())
    assert bool((pseudo.confidence >= 0.25 - 1e-6).all())  # the max of 4 probabilities


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 1}, ValueError, "num_classes"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"balance": "flex"}, ValueError, "balance"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"max_weight": -1.0}, ValueError, "max_weight"),
        ({"rampup_steps": -1}, ValueError, "rampup_steps"),
        ({"ramp": "cosine"}, ValueError, "ramp"),
        ({"prior": torch.tensor([1.0, -1.0, 1.0])}, ValueError, "prior"),
        ({"prior": torch.tensor([1.0, 1.0])}, ValueError, "prior"),
    ],
)
def test_pseudo_labeler_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    arguments = {"num_classes": 3, **kwargs}
    with pytest.raises(error, match=match):
        tk.PseudoLabeler(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("logits", "error", "match"),
    [
        (torch.randn(4, 2), ValueError, "3 classes"),
        (torch.randn(4), ValueError, "2-D"),
        (torch.zeros(0, 3), ValueError, "at least 1"),
        (torch.tensor([[float("nan"), 0.0, 0.0]]), ValueError, "finite"),
        (torch.ones(2, 3, dtype=torch.long), TypeError, "floating"),
        ([[0.0, 1.0, 2.0]], TypeError, "Tensor"),
    ],
)
def test_pseudo_labeler_rejects_bad_logits(
    logits: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        tk.PseudoLabeler(3)(logits)  # type: ignore[arg-type]


def test_pseudo_labeler_loss_rejects_mismatched_batches() -> None:
    labeler = tk.PseudoLabeler(3)
    pseudo = labeler(torch.randn(4, 3))
    with pytest.raises(ValueError, match="5 samples, got 4"):
        labeler.loss(torch.randn(5, 3), pseudo)
    with pytest.raises(TypeError, match="PseudoLabels"):
        labeler.loss(torch.randn(4, 3), pseudo.labels)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="update"):
        labeler(torch.randn(4, 3), update=1)  # type: ignore[arg-type]


def test_class_statistics_are_bias_corrected_from_the_first_batch() -> None:
    # momentum 0.999 (the default): without the correction the average would sit at
    # 0.999 * uniform + 0.001 * batch after one batch, and balancing would be nearly off
    labeler = tk.PseudoLabeler(2, balance="distribution")
    logits = torch.tensor([[3.0, 0.0]] * 9 + [[0.0, 1.0]])
    labeler(logits)
    torch.testing.assert_close(labeler.class_mean, logits.softmax(1).mean(0))
    labeler(logits)
    torch.testing.assert_close(labeler.class_mean, logits.softmax(1).mean(0))


def test_class_statistics_average_every_batch_seen() -> None:
    momentum = 0.9
    labeler = tk.PseudoLabeler(3, balance="class_threshold", momentum=momentum)
    batches = [torch.randn(5, 3) * 2 for _ in range(4)]
    raw = np.zeros(3)
    for batch in batches:
        labeler(batch)
        raw = momentum * raw + (1 - momentum) * batch.softmax(1).mean(0).double().numpy()
    expected = raw / (1 - momentum ** len(batches))
    np.testing.assert_allclose(labeler.class_mean.double().numpy(), expected, rtol=1e-5)
    assert float(labeler.class_mean.sum()) == pytest.approx(1.0, abs=1e-5)


def test_distribution_alignment_balances_a_dominant_class_at_the_default_momentum() -> None:
    # a network that calls most of the batch class 0: after alignment, class 0 no longer
    # takes every confident pseudo-label (it did when the uniform start damped the average)
    labeler = tk.PseudoLabeler(2, threshold=0.7, balance="distribution")
    logits = torch.tensor([[2.0, 0.0]] * 8 + [[0.5, 0.0]] * 2)
    pseudo = labeler(logits)
    # aligned: the 0.88-confident class-0 rows drop to 0.60, the 0.62 ones flip to class 1
    assert pseudo.mask.tolist() == [False] * 8 + [True] * 2
    assert pseudo.labels[pseudo.mask].tolist() == [1, 1]
    plain = tk.PseudoLabeler(2, threshold=0.7)(logits)
    assert plain.mask.tolist() == [True] * 8 + [False] * 2
    assert set(plain.labels.tolist()) == {0}


def test_state_dict_round_trip_keeps_the_bias_correction() -> None:
    labeler = tk.PseudoLabeler(3, balance="distribution", momentum=0.9)
    labeler(torch.randn(8, 3) * 3)
    other = tk.PseudoLabeler(3, balance="distribution", momentum=0.9)
    other.load_state_dict(labeler.state_dict())
    batch = torch.randn(8, 3) * 3
    torch.testing.assert_close(other(batch).confidence, labeler(batch).confidence)
    torch.testing.assert_close(other.class_mean, labeler.class_mean)
    # a state without the update count (saved before the correction) loads as converged
    old = {"steps": 0, "class_mean": torch.tensor([0.5, 0.3, 0.2])}
    other.load_state_dict(old)
    torch.testing.assert_close(other.class_mean, old["class_mean"])


# --------------------------------------------------------------------------- FixMatch


def test_fixmatch_trains_the_strong_view_on_weak_view_labels() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x = torch.randn(6, 4)

    def weak(v: torch.Tensor) -> torch.Tensor:
        return v * 2

    def strong(v: torch.Tensor) -> torch.Tensor:
        return v + 1

    fixmatch = tk.FixMatchLoss(tk.PseudoLabeler(3, threshold=0.5), weak=weak, strong=strong)
    loss = fixmatch(net, x)
    probs = net(weak(x)).softmax(1)
    conf, labels = probs.max(1)
    expected = (
        F.cross_entropy(net(strong(x)), labels, reduction="none") * (conf >= 0.5).float()
    ).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert net.weight.grad is not None
    assert fixmatch.last is not None and fixmatch.last.labels.tolist() == labels.tolist()


def test_fixmatch_step_advances_the_ramp_and_rejects_non_callables() -> None:
    fixmatch = tk.FixMatchLoss(
        tk.PseudoLabeler(3, rampup_steps=4, ramp="linear"),
        weak=tk.augment.weak,
        strong=tk.augment.strong,
    )
    fixmatch.step()
    assert fixmatch.labeler.weight == 0.25
    with pytest.raises(TypeError, match="strong"):
        tk.FixMatchLoss(tk.PseudoLabeler(3), weak=tk.augment.weak, strong=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="labeler"):
        tk.FixMatchLoss(3, weak=tk.augment.weak, strong=tk.augment.weak)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        fixmatch("net", torch.randn(2, 1, 8, 8))  # type: ignore[arg-type]


def test_fixmatch_takes_pseudo_labels_from_the_teacher_and_trains_only_the_model() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    teacher = tk.ModelEMA(net)
    with torch.no_grad():
        teacher.module.weight.zero_()
        teacher.module.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # always class 1
    x = torch.randn(6, 4)
    fixmatch = tk.FixMatchLoss(
        tk.PseudoLabeler(3, threshold=0.9), weak=lambda v: v, strong=lambda v: v
    )
    loss = fixmatch(net, x, teacher=teacher)
    assert fixmatch.last is not None and fixmatch.last.labels.tolist() == [1] * 6
    torch.testing.assert_close(loss, F.cross_entropy(net(x), torch.ones(6, dtype=torch.long)))
    loss.backward()
    assert net.weight.grad is not None
    assert teacher.module.weight.grad is None
    with pytest.raises(TypeError, match="teacher"):
        fixmatch(net, x, teacher="ema")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- augment

AUGMENTS = {
    "random_affine": lambda x, g: tk.augment.random_affine(
        x, degrees=20, translate=0.2, scale=(0.8, 1.2), generator=g
    ),
    "color_jitter": lambda x, g: tk.augment.color_jitter(
        x, brightness=0.5, contrast=0.5, saturation=0.5, permute_channels=True, generator=g
    ),
    "cutout": lambda x, g: tk.augment.cutout(x, size=5, generator=g),
    "weak": lambda x, g: tk.augment.weak(x, generator=g),
    "strong": lambda x, g: tk.augment.strong(x, generator=g),
}


@pytest.mark.parametrize("name", list(AUGMENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_augmentations_keep_shape_dtype_and_are_deterministic(
    name: str, dtype: torch.dtype
) -> None:
    x = torch.rand(5, 3, 12, 12).to(dtype)
    original = x.clone()
    first = AUGMENTS[name](x, torch.Generator().manual_seed(3))
    second = AUGMENTS[name](x, torch.Generator().manual_seed(3))
    other = AUGMENTS[name](x, torch.Generator().manual_seed(4))
    assert first.shape == x.shape and first.dtype == dtype
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(x, original)  # never in place


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_augmentations_draw_independently_per_sample(name: str) -> None:
    x = torch.rand(1, 3, 12, 12).repeat(6, 1, 1, 1)
    out = AUGMENTS[name](x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1


def test_random_affine_without_randomness_is_the_identity() -> None:
    x = torch.rand(3, 2, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(tk.augment.random_affine(x), x)


def test_random_affine_zoom_keeps_the_centre_pixel() -> None:
    x = torch.zeros(2, 1, 9, 9, dtype=torch.float64)
    x[:, 0, 4, 4] = 1.0
    out = tk.augment.random_affine(x, scale=(2.0, 2.0))  # zoom in 2x around the centre
    assert float(out[0, 0, 4, 4]) == pytest.approx(1.0)
    assert float(out[0, 0, 0, 0]) == 0.0 and float(out.sum()) > 1.0


def test_color_jitter_brightness_scales_and_clamps() -> None:
    x = torch.full((4, 3, 2, 2), 0.5)
    out = tk.augment.color_jitter(x, brightness=0.5, generator=torch.Generator().manual_seed(0))
    factors = out[:, 0, 0, 0] / 0.5
    assert bool(((factors >= 0.5) & (factors <= 1.5)).all())
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out))  # one factor per image
    bright = tk.augment.color_jitter(torch.ones(2, 1, 2, 2), brightness=1.0)
    assert float(bright.max()) <= 1.0


def test_cutout_zeroes_at_most_one_square_per_image() -> None:
    out = tk.augment.cutout(torch.ones(20, 2, 10, 10), size=4, generator=torch.Generator())
    zeros = (out == 0).float().sum(dim=(2, 3))
    assert bool((zeros <= 16).all()) and bool((zeros[:, 0] == zeros[:, 1]).all())
    assert float(zeros.sum()) > 0


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: tk.augment.weak(torch.rand(2, 28, 28)), ValueError, "4-D"),
        (lambda: tk.augment.weak(torch.zeros(2, 1, 4, 4, dtype=torch.long)), TypeError, "float"),
        (lambda: tk.augment.weak(torch.zeros(0, 1, 4, 4)), ValueError, "empty"),
        (
            lambda: tk.augment.random_affine(torch.rand(1, 1, 4, 4), degrees=-1),
            ValueError,
            "degrees",
        ),
        (
            lambda: tk.augment.random_affine(torch.rand(1, 1, 4, 4), scale=(2, 1)),
            ValueError,
            "scale",
        ),
        (
            lambda: tk.augment.random_affine(torch.rand(1, 1, 4, 4), padding_mode="wrap"),
            ValueError,
            "padding_mode",
        ),
        (
            lambda: tk.augment.color_jitter(torch.rand(1, 1, 4, 4), contrast=2),
            ValueError,
            "contrast",
        ),
        (lambda: tk.augment.cutout(torch.rand(1, 1, 4, 4), size=0), ValueError, "size"),
        (lambda: tk.augment.weak(torch.rand(1, 1, 4, 4), generator=0), TypeError, "generator"),  # type: ignore[arg-type]
    ],
)
def test_augmentations_reject_bad_input(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


# --------------------------------------------------------------------------- warm-up


def test_warmup_keeps_the_weight_at_zero_then_ramps_over_rampup_steps() -> None:
    labeler = tk.PseudoLabeler(3, warmup_steps=3, rampup_steps=4, ramp="linear", max_weight=2.0)
    weights = []
    for _ in range(9):
        weights.append(labeler.weight)
        labeler.step()
    assert weights == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    no_ramp = tk.PseudoLabeler(3, warmup_steps=2)
    assert no_ramp.weight == 0.0
    no_ramp.step()
    no_ramp.step()
    assert no_ramp.weight == 1.0


def test_fixmatch_runs_no_forward_pass_during_the_warmup() -> None:
    calls = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return torch.zeros(len(x), 3, requires_grad=True)

    fixmatch = tk.FixMatchLoss(
        tk.PseudoLabeler(3, threshold=0.0, warmup_steps=2),
        weak=tk.augment.weak,
        strong=tk.augment.strong,
    )
    x = torch.rand(4, 1, 8, 8)
    for _ in range(2):
        loss = fixmatch(model, x)
        assert float(loss) == 0.0 and loss.dtype == torch.float32
        assert fixmatch.last is None
        fixmatch.step()
    assert calls == []
    loss = fixmatch(model, x)
    assert calls == [4, 4]
    assert fixmatch.last is not None and fixmatch.last.fraction == 1.0
    torch.testing.assert_close(loss, torch.tensor(math.log(3.0)))


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, ValueError), (True, ValueError), ("2", ValueError)]
)
def test_warmup_steps_must_be_a_non_negative_integer(value: object, error: type[Exception]) -> None:
    with pytest.raises((TypeError, ValueError), match="warmup_steps"):
        tk.PseudoLabeler(3, warmup_steps=value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("balance", ["distribution", "class_threshold"])
def test_state_dict_round_trip_before_any_update_resumes_identically(balance: str) -> None:
    # a checkpoint taken during the warm-up (FixMatchLoss has not called the labeler yet)
    labeler = tk.PseudoLabeler(3, balance=balance)
    resumed = tk.PseudoLabeler(3, balance=balance)
    resumed.load_state_dict(labeler.state_dict())
    for _ in range(3):
        batch = torch.randn(8, 3) * 3
        torch.testing.assert_close(resumed(batch).confidence, labeler(batch).confidence)
        torch.testing.assert_close(resumed.class_mean, labeler.class_mean)
        torch.testing.assert_close(resumed.thresholds, labeler.thresholds)
    assert float(resumed.class_mean.sum()) == pytest.approx(1.0)


def test_state_dict_round_trip_through_torch_save_is_exact(tmp_path: Path) -> None:
    # the class statistics must come back bit for bit, whatever the number of updates
    torch.manual_seed(0)
    path = tmp_path / "labeler.pt"
    for updates in range(1, 30):
        labeler = tk.PseudoLabeler(4, balance="distribution", momentum=0.999, rampup_steps=50)
        for _ in range(updates):
            labeler(torch.randn(16, 4) * 2)
            labeler.step()
        torch.save(labeler.state_dict(), path)
        resumed = tk.PseudoLabeler(4, balance="distribution", momentum=0.999, rampup_steps=50)
        resumed.load_state_dict(torch.load(path, weights_only=True))
        assert resumed.steps == labeler.steps and resumed.weight == labeler.weight
        assert torch.equal(resumed.class_mean, labeler.class_mean), updates
        for _ in range(3):
            batch = torch.randn(16, 4) * 2
            a, b = labeler(batch), resumed(batch)
            assert torch.equal(a.confidence, b.confidence) and torch.equal(a.mask, b.mask)
        assert torch.equal(resumed.class_mean, labeler.class_mean), updates


def test_distribution_alignment_with_a_zero_prior_gives_finite_confidence() -> None:
    # all of a sample's probability on a class whose prior is 0: the aligned vector is
    # all zeros; that sample is simply not confident (never NaN)
    labeler = tk.PseudoLabeler(3, balance="distribution", prior=torch.tensor([0.0, 0.5, 0.5]))
    pseudo = labeler(torch.tensor([[200.0, 0.0, 0.0], [0.0, 3.0, 0.0]]))
    assert bool(torch.isfinite(pseudo.confidence).all()), pseudo.confidence
    assert pseudo.confidence[0] == 0.0 and not bool(pseudo.mask[0])
    assert int(pseudo.labels[1]) == 1 and bool(torch.isfinite(labeler.class_mean).all())
    zero_threshold = tk.PseudoLabeler(
        3, threshold=0.0, balance="distribution", prior=torch.tensor([0.0, 0.5, 0.5])
    )
    assert not bool(zero_threshold(torch.tensor([[200.0, 0.0, 0.0]])).mask[0])


def _bn_student_and_teacher() -> tuple[torch.nn.Module, tk.ModelEMA]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    return net, tk.ModelEMA(net)


def test_fixmatch_with_a_teacher_leaves_the_students_batchnorm_to_the_strong_view() -> None:
    net, teacher = _bn_student_and_teacher()
    fixmatch = tk.FixMatchLoss(
        tk.PseudoLabeler(3, threshold=0.0), weak=lambda v: v * 2, strong=lambda v: v + 1
    )
    x = torch.randn(16, 4)
    fixmatch(net, x, teacher=teacher)
    # one forward pass through the student (the strong view), one through the teacher
    assert int(net[1].num_batches_tracked) == 1
    assert int(teacher.module[1].num_batches_tracked) == 1
    reference = torch.nn.BatchNorm1d(8)
    with torch.no_grad():
        reference(net[0](x + 1))
    torch.testing.assert_close(net[1].running_mean, reference.running_mean)
    fixmatch(net, x)  # without a teacher the weak view goes through the student too
    assert int(net[1].num_batches_tracked) == 3


@pytest.mark.parametrize("teacher_training", [True, False])
def test_fixmatch_leaves_the_modes_of_model_and_teacher_as_they_were(
    teacher_training: bool,
) -> None:
    net, teacher = _bn_student_and_teacher()
    teacher.train(teacher_training)
    fixmatch = tk.FixMatchLoss(
        tk.PseudoLabeler(3, threshold=0.0), weak=lambda v: v, strong=lambda v: v
    )
    fixmatch(net, torch.randn(8, 4), teacher=teacher)
    assert net.training and all(m.training for m in net.modules())
    assert all(m.training == teacher_training for m in teacher.modules())
    if not teacher_training:  # an eval-mode teacher keeps its running statistics
        assert int(teacher.module[1].num_batches_tracked) == 0


def test_fixmatch_refuses_a_teacher_in_another_batchnorm_domain_than_the_model() -> None:
    # in eval mode the teacher would silently label target data with source statistics
    torch.manual_seed(0)
    net = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=10, width=8))
    teacher = tk.ModelEMA(net)
    teacher.eval()
    fixmatch = tk.FixMatchLoss(
        tk.PseudoLabeler(10, threshold=0.0), weak=lambda v: v, strong=lambda v: v
    )
    x = torch.rand(4, 1, 16, 16)
    with tk.bn_domain(net, "target"), pytest.raises(ValueError, match="bn_domain"):
        fixmatch(net, x, teacher=teacher)
    with tk.bn_domain(net, "target"), tk.bn_domain(teacher, "target"):
        loss = fixmatch(net, x, teacher=teacher)
    assert torch.isfinite(loss)
    fixmatch(net, x, teacher=teacher)  # both in the source domain: fine
    other = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=10, width=8), ("a", "b"))
    with tk.bn_domain(net, "target"):
        fixmatch(net, x, teacher=other)  # a teacher with other domains: not checked


def test_fixmatch_under_bfloat16_autocast_matches_float32() -> None:
    net, teacher = _bn_student_and_teacher()
    student_copy, teacher_copy = (
        tk.ModelEMA(net).module,
        tk.ModelEMA(teacher.module).module,
    )
    fixmatch = tk.FixMatchLoss(
        tk.PseudoLabeler(3, threshold=0.0), weak=lambda v: v * 2, strong=lambda v: v + 1
    )
    x = torch.randn(16, 4)
    reference = fixmatch(student_copy, x, teacher=teacher_copy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fixmatch(net, x, teacher=teacher)
    assert value.dtype == torch.float32
    assert math.isclose(float(value.detach()), float(reference.detach()), rel_tol=0.03)


def test_ramp_counts_steps_past_the_end_and_stops_where_step_stops() -> None:
    labeler = tk.recipe("self_training").pseudo_labeler(3, max_steps=8)
    weights = []
    for _ in range(12):  # more steps than planned: the weight stays at the top
        weights.append(labeler.weight)
        labeler.step()
    assert weights[:4] == [0.0] * 4 and weights[8:] == [1.0] * 4
    assert weights == sorted(weights)
    short = tk.recipe("self_training").pseudo_labeler(3, max_steps=8)
    for _ in range(5):  # fewer steps: the weight is where the ramp got to
        short.step()
    assert short.weight == pytest.approx(0.25)


@pytest.mark.parametrize(("height", "width"), [(16, 32), (32, 16), (10, 24)])
def test_random_affine_rotates_non_square_images_rigidly(height: int, width: int) -> None:
    # fails before the fix: the rotation acted on coordinates normalised per axis, so a
    # non-square image was sheared and stretched instead of rotated. Reference: the same
    # image zero-padded to a square canvas (where per-axis normalisation is harmless),
    # rotated by the same angles, then cropped back.
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    assert (side - height) % 2 == 0 and (side - width) % 2 == 0  # centres coincide
    x = torch.rand(
        6, 2, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    square = torch.zeros(6, 2, side, side, dtype=torch.float64)
    square[:, :, top : top + height, left : left + width] = x
    out = tk.augment.random_affine(x, degrees=60, generator=torch.Generator().manual_seed(5))
    reference = tk.augment.random_affine(
        square, degrees=60, generator=torch.Generator().manual_seed(5)
    )[:, :, top : top + height, left : left + width]
    # theta is built in float32: agreement to float32 precision (the defect was O(1))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(AUGMENTS))
@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 12, 20), (4, 3, 20, 12)])
def test_augmentations_keep_01_images_in_range_for_any_channels_and_aspect(
    name: str, shape: tuple[int, int, int, int]
) -> None:
    # bilinear sampling, clamping and zero fill never leave [0, 1] (bicubic would)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0)).round()  # hard edges
    out = AUGMENTS[name](x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 + 1e-6


def test_weak_view_shifts_by_at_most_a_sixteenth_of_the_size() -> None:
    # the weak view's documented bound: up to 0.0625 * 28 = 1.75 pixels along each axis
    x = torch.zeros(200, 1, 28, 28, dtype=torch.float64)
    x[:, 0, 14, 14] = 1.0
    out = tk.augment.weak(x, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(28, dtype=torch.float64)
    mass = out[:, 0].sum(dim=(1, 2))
    cy = (out[:, 0].sum(2) * rows).sum(1) / mass
    cx = (out[:, 0].sum(1) * rows).sum(1) / mass
    shift = torch.stack([cy - 14, cx - 14], 1).abs()
    assert float(shift.max()) <= 1.75 + 1e-6
    assert float(shift.max()) > 1.5  # the bound is reached, not a smaller one

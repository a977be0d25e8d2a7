"""Weight averaging (`tk.ModelEMA`): the mean teacher of self-training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import transferkit as tk

# --------------------------------------------------------------------------- ModelEMA


def _ema_reference(values: list[np.ndarray], decay: float) -> np.ndarray:
    """An independent NumPy loop: d_t = min(decay, 1 - 1/(t+1)), avg = d avg + (1-d) w."""
    average = np.zeros_like(values[0])
    for t, value in enumerate(values):
        d = min(decay, 1.0 - 1.0 / (t + 1))
        average = d * average + (1.0 - d) * value
    return average


@given(st.floats(0.0, 0.999), st.integers(1, 30))
def test_model_ema_matches_a_numpy_reference(decay: float, steps: int) -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = tk.ModelEMA(net, decay=decay)
    seen = []
    for _ in range(steps):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        seen.append(net.weight.detach().double().numpy().copy())
        ema.update(net)
    expected = _ema_reference(seen, decay)
    np.testing.assert_allclose(ema.module.weight.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert ema.updates == steps


def test_model_ema_starts_as_a_plain_average_then_decays() -> None:
    net = nn.Linear(1, 1, bias=False)
    ema = tk.ModelEMA(net, decay=0.9)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
    assert float(ema.module.weight) == pytest.approx(2.0)  # mean of 1, 2, 3 (warm-up)
    assert ema.current_decay == pytest.approx(0.75)
    for _ in range(20):
        ema.update(net)
    assert ema.current_decay == 0.9


def test_model_ema_copies_buffers_and_does_not_train_or_touch_the_model() -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    ema = tk.ModelEMA(net, decay=0.99)
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in net.parameters())
    net(torch.randn(16, 2))  # training mode: updates the running statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update(net)
    torch.testing.assert_close(ema.module[1].running_mean, net[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == 1
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    assert ema.module[0].weight is not net[0].weight


def test_model_ema_state_dict_round_trip_keeps_the_warmup(tmp_path: Path) -> None:
    net = nn.Linear(2, 2)
    ema = tk.ModelEMA(net, decay=0.99)
    for _ in range(3):
        ema.update(net)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    other = tk.ModelEMA(nn.Linear(2, 2), decay=0.99)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.updates == 3 and other.current_decay == ema.current_decay
    torch.testing.assert_close(other.module.weight, ema.module.weight)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "model"),
        ({"decay": 1.0}, ValueError, "decay"),
        ({"decay": -0.1}, ValueError, "decay"),
        ({"decay": True}, TypeError, "decay"),
        ({"decay": "0.9"}, TypeError, "decay"),
    ],
)
def test_model_ema_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    model = kwargs.pop("model", nn.Linear(2, 2))
    with pytest.raises(error, match=match):
        tk.ModelEMA(model, **kwargs)  # type: ignore[arg-type]


def test_model_ema_update_rejects_another_architecture() -> None:
    ema = tk.ModelEMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="architecture"):
        ema.update(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="shape"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="model"):
        ema.update("net")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- combinations


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_ema_of_a_half_precision_model_tracks_it_like_float64(dtype: torch.dtype) -> None:
    # a bf16/fp16 average updated in its own precision stalls: (1 - d) * step is below
    # half a unit in the last place, so every update rounds back to the old value
    torch.manual_seed(0)
    net = nn.Linear(8, 8).to(dtype)
    start = torch.rand(8, 8, dtype=torch.float64) + 0.5
    ema = tk.ModelEMA(net, decay=0.99)
    reference = torch.zeros_like(start)
    for t in range(300):
        with torch.no_grad():
            net.weight.copy_(start + 1e-3 * t)
        seen = net.weight.double()  # what the student holds, rounded to its dtype
        d = min(0.99, 1.0 - 1.0 / (t + 1))
        reference = d * reference + (1 - d) * seen
        ema.update(net)
    assert ema.module.weight.dtype == dtype
    # within rounding of the float64 average to the model's precision (half a unit)
    eps = torch.finfo(dtype).eps
    error = (ema.module.weight.double() - reference).abs()
    assert bool((error <= reference.abs() * eps / 2 + 1e-12).all()), float(error.max())


def test_model_ema_half_precision_state_dict_round_trip_continues_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 4).to(torch.bfloat16)
    ema = tk.ModelEMA(net, decay=0.99)

    def train(average: tk.ModelEMA, steps: range) -> None:
        for t in steps:
            with torch.no_grad():
                net.weight.fill_(0.5 + 1e-3 * t)
            average.update(net)

    train(ema, range(50))
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    resumed = tk.ModelEMA(nn.Linear(4, 4).to(torch.bfloat16), decay=0.99)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    train(ema, range(50, 150))
    train(resumed, range(50, 150))
    assert torch.equal(resumed.module.weight, ema.module.weight)


def test_model_ema_update_from_another_architecture_changes_nothing() -> None:
    # a replaced head: the check must come before any tensor is averaged
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 4))
    ema = tk.ModelEMA(net)
    other = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 5))
    other[1](torch.randn(8, 3))
    before = {k: v.clone() for k, v in ema.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="shape"):
        ema.update(other)
    for key, value in ema.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key
    assert ema.updates == 0


def test_model_ema_rejects_buffers_of_another_shape() -> None:
    # copy_ would broadcast a (1,) running mean into the average's (4,) one
    ema = tk.ModelEMA(nn.BatchNorm1d(4, affine=False))
    with pytest.raises(ValueError, match="running_mean"):
        ema.update(nn.BatchNorm1d(1, affine=False))


def test_model_ema_looks_through_data_parallel_and_compile_wrappers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    wrapped = nn.DataParallel(net)
    ema = tk.ModelEMA(wrapped, decay=0.5)
    assert isinstance(ema.module, nn.Sequential)  # the user's network, not the wrapper
    assert isinstance(tk.ModelEMA(torch.compile(net)).module, nn.Sequential)
    assert set(ema.module.state_dict()) == set(net.state_dict())  # loads into net as is
    for student in (wrapped, torch.compile(net), net):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net(torch.randn(8, 2))
        ema.update(student)
    assert ema.updates == 3
    torch.testing.assert_close(ema.module[1].running_mean, net[1].running_mean)
    assert (
        float((net[0].weight - ema.module[0].weight).mean().detach()) > 0.4
    )  # an average, lagging


def test_model_ema_starts_in_the_models_mode() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net.eval()
    ema = tk.ModelEMA(net)
    assert ema.training is False and ema.module.training is False
    was_training = ema.training  # the usual evaluate-then-restore pattern
    ema.eval()
    ema.train(was_training)
    assert not any(m.training for m in ema.modules())


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
def test_model_ema_follows_the_models_batchnorm_freezing(change: str) -> None:
    # tk.freeze(..., bn="eval") keeps frozen BatchNorm layers in eval mode; when the
    # student's policy changes after the average was built, the teacher must follow,
    # or it normalises with other statistics than the student in training mode
    torch.manual_seed(0)
    net = tk.models.SmallCNN(num_classes=10, width=8)
    if change == "unfreeze":
        tk.freeze(net, until="features", bn="eval")
    ema = tk.ModelEMA(net, decay=0.5)
    if change == "freeze":
        tk.freeze(net, until="features", bn="eval")
    else:
        tk.unfreeze(net)
    net.train()
    ema.train()
    ema.update(net)  # the first update copies: the teacher must compute what the model does
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ema(x), net(x))
    student_modes = [m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    teacher_modes = [m.training for m in ema.modules() if isinstance(m, nn.BatchNorm2d)]
    assert teacher_modes == student_modes


def test_model_ema_averages_complex_parameters() -> None:
    net = nn.Linear(2, 2)
    net.register_parameter("phase", nn.Parameter(torch.zeros(2, dtype=torch.complex64)))
    ema = tk.ModelEMA(net, decay=0.5)
    for value in (1 + 1j, 3 + 3j):
        with torch.no_grad():
            net.phase.fill_(value)
        ema.update(net)
    torch.testing.assert_close(ema.module.phase, torch.full((2,), 2 + 2j, dtype=torch.complex64))


def test_model_ema_of_domain_specific_batchnorm_copies_every_domains_statistics() -> None:
    torch.manual_seed(0)
    net = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=10, width=8))
    ema = tk.ModelEMA(net)
    net.train()
    net(torch.randn(8, 1, 16, 16))
    with tk.bn_domain(net, "target"):
        net(torch.randn(8, 1, 16, 16) * 3 + 2)
        ema.update(net)  # copied whatever domain is active
    for name, buffer in net.named_buffers():
        assert torch.equal(ema.module.get_buffer(name), buffer), name
    assert int(ema.module.get_buffer("features.1.norms.target.num_batches_tracked")) == 1
    ema.eval()
    net.eval()
    x = torch.randn(4, 1, 16, 16) * 3 + 2
    with torch.no_grad():
        with tk.bn_domain(ema, "target"), tk.bn_domain(net, "target"):
            torch.testing.assert_close(ema(x), net(x))
        with tk.bn_domain(ema, "source"), tk.bn_domain(net, "target"):
            assert not torch.allclose(ema(x), net(x), atol=1e-3)  # another domain differs


def test_model_ema_tracks_a_parameter_unfrozen_after_it_was_built() -> None:
    net = nn.Linear(2, 2)
    net.weight.requires_grad_(False)
    ema = tk.ModelEMA(net, decay=0.5)
    net.weight.requires_grad_(True)
    for value in (1.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 2.0))
    assert not ema.module.weight.requires_grad


def test_model_ema_copies_integer_buffers_next_to_low_precision_parameters() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    ema = tk.ModelEMA(net)
    net(torch.randn(8, 2, dtype=torch.bfloat16))
    net(torch.randn(8, 2, dtype=torch.bfloat16))
    ema.update(net)
    assert ema.module[1].num_batches_tracked.dtype == torch.int64
    assert int(ema.module[1].num_batches_tracked) == 2
    assert torch.equal(ema.module[1].running_var, net[1].running_var)


@pytest.mark.cuda
def test_model_ema_kept_on_the_cpu_follows_a_cuda_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ema = tk.ModelEMA(net, decay=0.5)  # stays on the CPU to save GPU memory
    net.cuda()
    for value in (1.0, 3.0):
        with torch.no_grad():
            net[0].weight.fill_(value)
        net(torch.randn(8, 2, device="cuda"))
        ema.update(net)
    assert ema.module[0].weight.device.type == "cpu"
    torch.testing.assert_close(ema.module[0].weight, torch.full((3, 2), 2.0))
    torch.testing.assert_close(ema.module[1].running_mean, net[1].running_mean.cpu())


def test_model_ema_refuses_a_state_dict_with_corrupt_extra_state() -> None:
    ema = tk.ModelEMA(nn.Linear(2, 2).to(torch.bfloat16))
    ema.update(nn.Linear(2, 2).to(torch.bfloat16))
    state = ema.state_dict()
    assert set(state["_extra_state"]["master"]) == {"weight", "bias"}
    for bad in ({"updates": -1}, {"updates": 1, "master": {"weight": "w"}}, "updates"):
        with pytest.raises((TypeError, ValueError), match="updates|master"):
            ema.load_state_dict({**state, "_extra_state": bad})


def test_model_ema_built_inside_a_bn_domain_block_rests_like_the_model() -> None:
    """A copy made inside ``bn_domain(model, "target")`` must not stay in "target".

    Before the fix the copy kept the block's domain for good: outside any block the
    teacher normalised with target statistics while the student used its default
    (source) ones, and nothing said so.
    """
    torch.manual_seed(0)
    student = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=3, width=4))
    student.train()
    with tk.bn_domain(student, "target"):
        student(torch.randn(8, 1, 16, 16) * 3 + 2)  # target statistics differ
    with tk.bn_domain(student, "target"):
        teacher = tk.ModelEMA(student)
        inside = [m.domain for m in teacher.module.modules() if hasattr(m, "domains")]
    rest = [m.domain for m in teacher.module.modules() if hasattr(m, "domains")]
    assert inside == rest == ["source"] * len(rest)
    student.eval()
    teacher.eval()
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(teacher(x), student(x), rtol=0, atol=0)
    with tk.bn_domain(student, "target"), tk.bn_domain(teacher, "target"):
        torch.testing.assert_close(teacher(x), student(x), rtol=0, atol=0)
    # a domain set on purpose outside any block is the model's resting domain: kept
    for layer in student.modules():
        if isinstance(layer, tk.DomainSpecificBatchNorm):
            layer.domain = "target"
    kept = tk.ModelEMA(student)
    assert {m.domain for m in kept.module.modules() if hasattr(m, "domains")} == {"target"}

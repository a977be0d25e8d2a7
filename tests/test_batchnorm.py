"""AdaBN (`tk.adapt_batchnorm`) and domain-specific BatchNorm (`tk.convert_domain_bn`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import transferkit as tk


def _net(*, final_bn: bool = True) -> nn.Sequential:
    """Two conv-BN blocks and a Linear (plus a BatchNorm1d after it unless told not to)."""
    torch.manual_seed(0)
    tail = [nn.BatchNorm1d(6)] if final_bn else []
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        *tail,
    )


def _numpy_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and unbiased variance over every axis but 1, in float64."""
    channels = np.moveaxis(values.astype(np.float64), 1, 0).reshape(values.shape[1], -1)
    return channels.mean(axis=1), channels.var(axis=1, ddof=1)


def test_adapt_batchnorm_equals_numpy_mean_and_variance_of_the_target() -> None:
    net = _net()
    target = torch.randn(50, 2, 5, 5, dtype=torch.float64) * 2 + 3
    net.double()
    tk.adapt_batchnorm(net, target, batch_size=7)  # uneven batches: 8 batches of 6-7
    first = net[0](target).detach().numpy()
    mean, var = _numpy_stats(first)
    np.testing.assert_allclose(net[1].running_mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(net[1].running_var.numpy(), var, rtol=1e-10)


def test_adapt_batchnorm_deeper_layers_match_a_single_batch_reference() -> None:
    # with one batch, each layer's input is computed with batch statistics upstream
    net = _net().double()
    target = torch.randn(40, 2, 5, 5, dtype=torch.float64)
    tk.adapt_batchnorm(net, target, batch_size=64)
    x = net[0](target).detach().numpy()
    m, v = _numpy_stats(x)
    biased = v * (x.size / 3 - 1) / (x.size / 3)
    normed = (x - m[None, :, None, None]) / np.sqrt(biased[None, :, None, None] + 1e-5)
    normed = normed * net[1].weight.detach().numpy()[None, :, None, None]
    normed = normed + net[1].bias.detach().numpy()[None, :, None, None]
    second = net[4](torch.from_numpy(np.maximum(normed, 0))).detach().numpy()  # no dropout
    mean, var = _numpy_stats(second)
    np.testing.assert_allclose(net[5].running_mean.numpy(), mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(net[5].running_var.numpy(), var, rtol=1e-8)


def test_adapt_batchnorm_first_layer_does_not_depend_on_the_batching() -> None:
    target = torch.randn(30, 2, 5, 5, dtype=torch.float64)
    a, b = _net().double(), _net().double()
    tk.adapt_batchnorm(a, target, batch_size=30)
    tk.adapt_batchnorm(b, target, batch_size=4)
    torch.testing.assert_close(a[1].running_mean, b[1].running_mean)
    torch.testing.assert_close(a[1].running_var, b[1].running_var)


def test_adapt_batchnorm_restores_modes_and_momenta_and_keeps_parameters() -> None:
    net = _net()
    net.train()
    net[3].eval()  # a mixed state must come back as it was
    net[1].momentum = 0.3
    modes = {name: m.training for name, m in net.named_modules()}
    params = copy.deepcopy(dict(net.named_parameters()))
    target = torch.randn(20, 2, 5, 5)
    returned = tk.adapt_batchnorm(net, target)
    assert returned is net
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1
    for name, value in net.named_parameters():
        assert torch.equal(value, params[name]), name
    assert int(net[1].num_batches_tracked) == 1


def test_adapt_batchnorm_restores_everything_when_the_pass_raises() -> None:
    net = _net().eval()
    before = copy.deepcopy(net.state_dict())

    class Boom(Exception):
        pass

    calls = 0

    def fail_on_second_batch(module: nn.Module, args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Boom

    handle = net[4].register_forward_pre_hook(fail_on_second_batch)
    with pytest.raises(Boom):
        tk.adapt_batchnorm(net, torch.randn(20, 2, 5, 5), batch_size=5)
    handle.remove()
    assert not any(m.training for m in net.modules())
    assert net[1].momentum == 0.1
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_adapt_batchnorm_uses_dropout_in_eval_mode() -> None:
    # dropout active during the pass would scale the statistics of later layers
    net = _net().double()
    target = torch.randn(40, 2, 5, 5, dtype=torch.float64)
    a = tk.adapt_batchnorm(copy.deepcopy(net), target)
    b = copy.deepcopy(net)
    b[3].p = 0.0
    tk.adapt_batchnorm(b, target)
    torch.testing.assert_close(a[5].running_var, b[5].running_var)


@pytest.mark.parametrize("kind", ["ndarray", "dataset", "loader", "pairs"])
def test_adapt_batchnorm_accepts_arrays_datasets_and_loaders(kind: str) -> None:
    target = torch.randn(24, 2, 5, 5)
    reference = tk.adapt_batchnorm(_net(), target)
    data: object
    if kind == "ndarray":
        data = target.numpy()
    elif kind == "dataset":
        data = TensorDataset(target)
    elif kind == "loader":
        data = DataLoader(TensorDataset(target), batch_size=24)
    else:
        data = DataLoader(TensorDataset(target, torch.zeros(24, dtype=torch.long)), batch_size=24)
    net = tk.adapt_batchnorm(_net(), data)
    torch.testing.assert_close(net[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(net[5].running_var, reference[5].running_var)


def test_adapt_batchnorm_leaves_the_input_alone_and_shows_a_progress_bar(
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = torch.randn(10, 2, 5, 5)
    copy_ = target.clone()
    tk.adapt_batchnorm(_net(), target, batch_size=4, progress=True)
    assert torch.equal(target, copy_)
    assert "adapt_batchnorm" in capsys.readouterr().err


def test_adapt_batchnorm_skips_layers_frozen_in_eval_mode() -> None:
    net = _net()
    tk.freeze(net, include=["1.*"], bn="eval")
    before = net[1].running_mean.clone()
    tk.adapt_batchnorm(net, torch.randn(10, 2, 5, 5) + 4)
    assert torch.equal(net[1].running_mean, before)
    assert not torch.equal(net[5].running_mean, torch.zeros(6))


@pytest.mark.parametrize(
    ("model", "data", "error", "match"),
    [
        ("net", torch.randn(1, 2, 5, 5), ValueError, "at least 2 samples"),
        ("net", torch.full((4, 2, 5, 5), float("nan")), ValueError, "finite"),
        ("net", "images", TypeError, "data"),
        ("linear", torch.randn(4, 3), ValueError, "no BatchNorm"),
        ("not a model", torch.randn(4, 3), TypeError, "model"),
    ],
)
def test_adapt_batchnorm_rejects_bad_input(
    model: str, data: object, error: type[Exception], match: str
) -> None:
    net: object = {"net": _net(), "linear": nn.Linear(3, 2)}.get(model, model)
    with pytest.raises(error, match=match):
        tk.adapt_batchnorm(net, data)  # type: ignore[arg-type]


def test_adapt_batchnorm_never_makes_a_batch_of_one_sample() -> None:
    bn = nn.Sequential(nn.BatchNorm1d(2))
    tk.adapt_batchnorm(bn, torch.randn(3, 2), batch_size=2)  # not [2, 1]
    assert int(bn[0].num_batches_tracked) == 1


def test_adapt_batchnorm_rejects_non_bool_progress_and_bad_batch_size() -> None:
    with pytest.raises(TypeError, match="progress"):
        tk.adapt_batchnorm(_net(), torch.randn(4, 2, 5, 5), progress=1)  # type: ignore[arg-type]
    for bad in (0, 1):
        with pytest.raises(ValueError, match="batch_size"):
            tk.adapt_batchnorm(_net(), torch.randn(4, 2, 5, 5), batch_size=bad)


@given(st.integers(2, 40), st.integers(2, 50))
def test_adapt_batchnorm_mean_is_the_target_mean_for_any_batching(n: int, batch: int) -> None:
    bn = nn.Sequential(nn.BatchNorm1d(3)).double()
    x = torch.arange(n * 3, dtype=torch.float64).reshape(n, 3).sin() * 5
    tk.adapt_batchnorm(bn, x, batch_size=batch)
    np.testing.assert_allclose(bn[0].running_mean.numpy(), x.numpy().mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn[0].running_var.numpy(), x.numpy().var(0, ddof=1), rtol=1e-9)


# --------------------------------------------------------------------------- DSBN


def test_domain_specific_batchnorm_keeps_separate_statistics() -> None:
    net = tk.convert_domain_bn(tk.models.SmallCNN(num_classes=4, width=4))
    net.train()
    source, target = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8) * 3 + 5
    net(source)
    layer = net.features[1]
    assert isinstance(layer, tk.DomainSpecificBatchNorm)
    untouched = layer.norms["target"].running_mean.clone()
    source_stats = layer.norms["source"].running_mean.clone()
    assert torch.equal(untouched, torch.zeros_like(untouched))
    with tk.bn_domain(net, "target"):
        net(target)
    assert torch.equal(layer.norms["source"].running_mean, source_stats)
    assert not torch.equal(layer.norms["target"].running_mean, untouched)
    assert layer.domain == "source"


def test_domain_specific_batchnorm_in_eval_uses_the_active_domains_statistics() -> None:
    bn = nn.BatchNorm1d(2)
    dsbn = tk.DomainSpecificBatchNorm(bn).eval()
    dsbn.norms["target"].running_mean.fill_(3.0)
    x = torch.full((4, 2), 3.0)
    assert torch.allclose(dsbn(x), torch.full((4, 2), 3.0 / (1 + 1e-5) ** 0.5))
    with tk.bn_domain(dsbn, "target"):
        assert torch.allclose(dsbn(x), torch.zeros(4, 2))


@pytest.mark.parametrize("affine", ["shared", "separate"])
def test_convert_domain_bn_keeps_the_output_and_the_affine_mode(affine: str) -> None:
    net = _net().eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2)
        net[1].running_mean.uniform_(-1, 1)
    x = torch.randn(6, 2, 5, 5)
    expected = net(x)
    converted = tk.convert_domain_bn(copy.deepcopy(net), affine=affine)  # type: ignore[arg-type]
    torch.testing.assert_close(converted(x), expected)
    with tk.bn_domain(converted, "target"):
        torch.testing.assert_close(converted(x), expected)  # same statistics at the start
    names = {n for n, _ in converted.named_parameters()}
    if affine == "shared":
        assert "1.weight" in names and "1.norms.target.weight" not in names
    else:
        assert "1.weight" not in names and "1.norms.target.weight" in names


def test_shared_affine_gets_gradients_from_both_domains() -> None:
    net = tk.convert_domain_bn(_net())
    net.train()
    with tk.bn_domain(net, "target"):
        net(torch.randn(4, 2, 5, 5)).sum().backward()
    assert net[1].weight.grad is not None


def test_adapt_batchnorm_on_dsbn_updates_only_the_active_domain() -> None:
    net = tk.convert_domain_bn(_net())
    before = net[1].norms["source"].running_mean.clone()
    with tk.bn_domain(net, "target"):
        tk.adapt_batchnorm(net, torch.randn(10, 2, 5, 5) + 2)
    assert torch.equal(net[1].norms["source"].running_mean, before)
    assert float(net[1].norms["target"].running_mean.abs().sum()) > 0


def test_bn_domain_restores_the_domain_after_an_exception() -> None:
    net = tk.convert_domain_bn(_net())
    with pytest.raises(RuntimeError), tk.bn_domain(net, "target"):
        raise RuntimeError("boom")
    assert net[1].domain == "source"


def test_state_dict_round_trip_keeps_both_domains() -> None:
    net = tk.convert_domain_bn(_net())
    with tk.bn_domain(net, "target"):
        net.train()(torch.randn(8, 2, 5, 5) + 1)
    clone = tk.convert_domain_bn(_net())
    clone.load_state_dict(net.state_dict())
    torch.testing.assert_close(
        clone[1].norms["target"].running_mean, net[1].norms["target"].running_mean
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: tk.convert_domain_bn(nn.Linear(2, 2)), ValueError, "no BatchNorm"),
        (lambda: tk.convert_domain_bn(_net(), domains=("a",)), ValueError, "two"),
        (lambda: tk.convert_domain_bn(_net(), domains=("a", "a")), ValueError, "unique"),
        (lambda: tk.convert_domain_bn(_net(), domains="st"), TypeError, "domains"),
        (lambda: tk.convert_domain_bn(_net(), affine="both"), ValueError, "affine"),
        (lambda: tk.DomainSpecificBatchNorm(nn.Linear(2, 2)), TypeError, "norm"),
        (lambda: tk.bn_domain(_net(), "target").__enter__(), ValueError, "convert_domain_bn"),
        (
            lambda: tk.bn_domain(tk.convert_domain_bn(_net()), "targt").__enter__(),
            ValueError,
            "did you mean 'target'",
        ),
    ],
)
def test_domain_bn_rejects_bad_input(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]

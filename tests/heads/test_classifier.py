"""ClassifierHead: pooling by layout, hidden layers, checks, training on real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk

POOLS = ["avg", "max", "avgmax", "token", None]


SHAPES = {"map": (3, 6, 4, 5), "tokens": (3, 7, 6), "features": (3, 6)}


def numpy_pool(x: np.ndarray, pool: str | None) -> np.ndarray | None:
    """Independent reference; None where the combination is an error."""
    if x.ndim == 2:
        if pool == "avgmax":
            return np.concatenate([x, x], axis=1)
        return x
    if pool is None:
        return None
    if x.ndim == 4:
        if pool == "token":
            return None
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        avg, peak = flat.mean(axis=2), flat.max(axis=2)
    else:
        if pool == "token":
            return x[:, 0]
        avg, peak = x.mean(axis=1), x.max(axis=1)
    return {"avg": avg, "max": peak, "avgmax": np.concatenate([avg, peak], axis=1)}[pool]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("layout", list(SHAPES))
def test_pooling_matches_numpy_reference_for_every_mode_and_layout(
    pool: str | None, layout: str
) -> None:
    torch.manual_seed(0)
    head = tk.ClassifierHead(6, 4, hidden=(5,), pool=pool)  # type: ignore[arg-type]
    x = torch.randn(*SHAPES[layout])
    expected = numpy_pool(x.numpy(), pool)
    if expected is None:
        with pytest.raises(ValueError, match="input"):
            head(x)
        return
    np.testing.assert_allclose(head.pool(x).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert head(x).shape == (3, 4)
    assert head.hidden[0].in_features == expected.shape[1]


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_hidden_layers_norm_and_activation(norm: str | None, activation: str) -> None:
    head = tk.ClassifierHead(8, 3, hidden=(16, 4), dropout=0.1, norm=norm, activation=activation)  # type: ignore[arg-type]
    kinds = [type(m).__name__ for m in head.hidden]
    norm_name = {None: [], "batch": ["BatchNorm1d"], "layer": ["LayerNorm"]}[norm]
    act = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh"}[activation]
    assert kinds == ["Linear", *norm_name, act, "Dropout"] * 2
    assert head(torch.randn(5, 8, 2, 2)).shape == (5, 3)
    assert head.fc.in_features == 4


def test_linear_head_without_hidden_layers_applies_dropout_to_features() -> None:
    head = tk.ClassifierHead(8, 3, hidden=(), dropout=0.3, pool=None)
    assert [type(m).__name__ for m in head.hidden] == ["Dropout"]
    head.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(head(x), x @ head.fc.weight.T + head.fc.bias)


def test_classifier_head_validates_arguments_and_input() -> None:
    with pytest.raises(ValueError, match="pool"):
        tk.ClassifierHead(4, 2, pool="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation"):
        tk.ClassifierHead(4, 2, activation="relu6")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm"):
        tk.ClassifierHead(4, 2, norm="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dropout"):
        tk.ClassifierHead(4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="in_features"):
        tk.ClassifierHead(0, 2)
    with pytest.raises(TypeError, match="hidden"):
        tk.ClassifierHead(4, 2, hidden=8)  # type: ignore[arg-type]
    head = tk.ClassifierHead(4, 2)
    with pytest.raises(ValueError, match="in_features = 4"):
        head(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="in_features = 4"):
        head(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="input: expected a 2-D or 3-D or 4-D"):
        head(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        head(torch.ones(2, 4, dtype=torch.long))


@pytest.mark.slow
def test_classifier_head_on_frozen_pretrained_features_learns_digits() -> None:
    task = tk.datasets.digits("none", seed=0)
    torch.manual_seed(0)
    net = tk.models.SmallCNN(width=8, feature_dim=32)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = tk.datasets.make_loader(task.source_x, task.source_y, batch_size=64, seed=0)
    net.train()
    for _ in range(6):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(xb), yb).backward()
            optimizer.step()
    # a new head on the convolutional maps: keep only the conv features
    model = nn.Sequential(net.features, tk.ClassifierHead(16, 10, hidden=(32,), pool="avgmax"))
    tk.freeze(model, exclude="1")
    probe = torch.optim.Adam(tk.param_groups(model, 1e-2))
    x, y = task.few_shot(20, seed=0)
    model.train()
    for _ in range(80):
        probe.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        probe.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(task.target_test_x).argmax(1) == task.target_test_y).float().mean())
    assert accuracy > 0.6


def test_linear_classifier_head_equals_timm_style_linear_head() -> None:
    """``ClassifierHead(C, n, hidden=(), dropout=0.0)`` is timm's default head: global
    average pooling and one Linear (the default ``hidden=(512,)`` adds an MLP layer)."""
    torch.manual_seed(0)
    ours = tk.ClassifierHead(6, 4, hidden=(), dropout=0.0)
    reference = nn.Linear(6, 4)
    with torch.no_grad():
        ours.fc.weight.copy_(reference.weight)
        ours.fc.bias.copy_(reference.bias)
    x = torch.randn(3, 6, 5, 5)
    ours.train()  # no dropout layer, so train and eval agree
    torch.testing.assert_close(ours(x), reference(x.mean((2, 3))))
    assert not any(isinstance(m, nn.Dropout) for m in ours.modules())
    default = tk.ClassifierHead(6, 4)
    assert [type(m).__name__ for m in default.hidden] == ["Linear", "ReLU", "Dropout"]
    assert default.hidden[0].out_features == 512 and default.hidden[2].p == 0.5


def test_public_objects_name_the_package_not_its_private_files() -> None:
    # pickles, reprs and feature-cache fingerprints stay as before the package split
    for name in tk.heads.__all__:
        assert getattr(tk.heads, name).__module__ == "transferkit.heads", name


def test_norm_without_hidden_layers_is_an_error_not_ignored() -> None:
    # failed before the fix: ClassifierHead(C, n, hidden=(), norm=...) built a head with
    # no normalisation at all, silently
    for norm in ("batch", "layer"):
        with pytest.raises(ValueError, match=r"norm: .*hidden=\(\)"):
            tk.ClassifierHead(8, 3, hidden=(), norm=norm)  # type: ignore[arg-type]
    head = tk.ClassifierHead(8, 3, hidden=(4,), norm="layer", pool=None)
    assert sum(isinstance(m, nn.LayerNorm) for m in head.modules()) == 1


def test_a_one_dimensional_map_is_pooled_over_its_length_once_transposed() -> None:
    """Guard: (N, C, L) is not a token layout; the error says to transpose, and the
    transposed map pools over L like an (N, C, L, 1) map pools over its spatial size."""
    x = torch.randn(2, 6, 9)  # C = 6 channels, L = 9
    head = tk.ClassifierHead(6, 3, hidden=(), dropout=0.0, pool="avgmax")
    with pytest.raises(ValueError, match=r"for a 1-D map \(N, C, L\) pass x.transpose\(1, 2\)"):
        head(x)
    torch.testing.assert_close(head.pool(x.transpose(1, 2)), head.pool(x.unsqueeze(-1)))

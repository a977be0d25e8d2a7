from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk

POOLS = ["avg", "max", "avgmax", "token", None]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Tiny models: one thread avoids OpenMP spin-waiting on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


# --------------------------------------------------------------------------- find_head


class TimmLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.head = nn.Module()
        self.head.norm = nn.LayerNorm(8)
        self.head.fc = nn.Linear(8, 3)
        self.num_classes = 3

    def get_classifier(self) -> nn.Module:
        return self.head.fc


class HFLike(nn.Module):
    def __init__(self, attribute: str = "classifier") -> None:
        super().__init__()
        self.bert = nn.Linear(4, 8)
        setattr(self, attribute, nn.Linear(8, 2))
        self.num_labels = 2
        self.config = SimpleNamespace(num_labels=2)


def vgg_like() -> nn.Module:
    model = nn.Module()
    model.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model.classifier = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 5))
    return model


def vit_like() -> nn.Module:
    model = nn.Module()
    model.encoder = nn.Linear(4, 8)
    model.heads = nn.Sequential(OrderedDict(head=nn.Linear(8, 5)))
    return model


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: tk.models.SmallCNN(), "fc"),
        (lambda: tk.models.MLP(3, 2), "fc"),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(1)), "2"),
        (vgg_like, "classifier.3"),
        (vit_like, "heads.head"),
        (TimmLike, "head.fc"),
        (HFLike, "classifier"),
        (lambda: HFLike("score"), "score"),
    ],
)
def test_find_head_on_common_layouts(factory: object, expected: str) -> None:
    model = factory()  # type: ignore[operator]
    name, head = tk.find_head(model)
    assert name == expected
    assert model.get_submodule(name) is head


def test_find_head_raises_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"cannot find the classifier of Conv2d.*name="):
        tk.find_head(nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="model"):
        tk.find_head("resnet")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- replace_head


@pytest.mark.parametrize(
    ("factory", "in_features"),
    [(vgg_like, 8), (vit_like, 8), (TimmLike, 8), (HFLike, 8), (tk.models.SmallCNN, 128)],
)
def test_replace_head_infers_in_features(factory: object, in_features: int) -> None:
    model = factory()  # type: ignore[operator]
    name, _ = tk.find_head(model)
    new = tk.replace_head(model, 7)
    assert isinstance(new, nn.Linear) and new.in_features == in_features and new.out_features == 7
    assert model.get_submodule(name) is new


def test_replace_head_updates_class_counts_of_timm_and_hf_models() -> None:
    timm_like = TimmLike()
    tk.replace_head(timm_like, 6)
    assert timm_like.num_classes == 6
    hf_like = HFLike()
    tk.replace_head(hf_like, tk.ClassifierHead(8, 4, hidden=()))
    assert hf_like.num_labels == 4 and hf_like.config.num_labels == 4


def test_replace_head_with_module_device_dtype_and_name() -> None:
    model = tk.models.SmallCNN(num_classes=3).double()
    head = tk.replace_head(model, tk.ClassifierHead(128, 5, hidden=(16,), pool=None))
    assert next(head.parameters()).dtype == torch.float64
    assert model(torch.zeros(2, 1, 16, 16, dtype=torch.float64)).shape == (2, 5)
    neck = tk.replace_head(model, 9, name="neck.1")
    assert isinstance(neck, nn.Linear) and model.neck[1] is neck and neck.in_features == 1024
    with pytest.raises(ValueError, match=r"name: 'nek' is not a module.*'neck'"):
        tk.replace_head(model, 3, name="nek")


def test_replace_head_rejects_mismatched_or_bad_heads() -> None:
    model = tk.models.SmallCNN()
    with pytest.raises(ValueError, match="takes 64 features but 'fc' receives 128"):
        tk.replace_head(model, nn.Linear(64, 3))
    with pytest.raises(TypeError, match="head_or_num_classes"):
        tk.replace_head(model, "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head_or_num_classes"):
        tk.replace_head(model, 0)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10  # untouched


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


# --------------------------------------------------------------------------- headless models


class HeadlessTimmLike(nn.Module):
    """timm's contract for ``num_classes=0``: an identity classifier, ``num_features``,
    ``head_hidden_size`` (the classifier's input, after a pre-logits layer) and
    ``reset_classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3)
        self.conv_head = nn.Linear(6, 10)  # pre-logits: 6 -> 10
        self.num_features = 6
        self.head_hidden_size = 10
        self.num_classes = 0
        self.classifier: nn.Module = nn.Identity()
        self.resets = 0

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.resets += 1
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.head_hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(self.conv_head(self.stem(x).mean((2, 3))))
        return out


def headless_small_cnn() -> nn.Module:
    net = tk.models.SmallCNN(width=4, feature_dim=24)
    net.fc = nn.Identity()  # type: ignore[assignment]
    return net


def headless_vgg_like() -> nn.Module:
    model = vgg_like()
    model.classifier[3] = nn.Identity()
    return model


def headless_vit_like() -> nn.Module:
    model = vit_like()
    model.heads.head = nn.Identity()
    return model


@pytest.mark.parametrize(
    ("factory", "name", "in_features"),
    [
        (headless_small_cnn, "fc", 24),
        (headless_vgg_like, "classifier.3", 8),
        (headless_vit_like, "heads.head", 8),
    ],
)
def test_replace_head_on_headless_models_sizes_head_from_the_layer_before(
    factory: object, name: str, in_features: int
) -> None:
    """torchvision-style ``model.fc = nn.Identity()``: the head used to be unreplaceable
    (or, in a Sequential, the hidden Linear before the identity was replaced)."""
    model = factory()  # type: ignore[operator]
    assert tk.find_head(model)[0] == name
    head = tk.replace_head(model, 3)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (in_features, 3)
    assert model.get_submodule(name) is head


def test_replace_head_on_headless_small_cnn_gives_working_model_in_its_dtype() -> None:
    model = headless_small_cnn().double()
    head = tk.replace_head(model, 5)
    assert head.weight.dtype == torch.float64
    assert model(torch.zeros(2, 1, 16, 16, dtype=torch.float64)).shape == (2, 5)
    with pytest.raises(ValueError, match="takes 7 features but 'fc' receives 24"):
        tk.replace_head(headless_small_cnn(), nn.Linear(7, 2))


def test_replace_head_on_headless_timm_model_uses_reset_classifier() -> None:
    model = HeadlessTimmLike().double()
    head = tk.replace_head(model, 4)
    assert model.resets == 1 and model.classifier is head and model.num_classes == 4
    assert isinstance(head, nn.Linear) and head.in_features == 10  # head_hidden_size
    assert head.weight.dtype == torch.float64
    assert model(torch.zeros(2, 3, 5, 5, dtype=torch.float64)).shape == (2, 4)
    # a given module is checked against the classifier's input size
    custom = tk.replace_head(HeadlessTimmLike(), tk.ClassifierHead(10, 2, hidden=(), pool=None))
    assert isinstance(custom, tk.ClassifierHead)
    with pytest.raises(ValueError, match="receives 10"):
        tk.replace_head(HeadlessTimmLike(), nn.Linear(6, 2))


def test_replace_head_on_headless_model_without_sizes_raises_clearly() -> None:
    model = nn.Sequential(nn.ReLU(), nn.Identity())
    with pytest.raises(ValueError, match=r"'1' is an identity \(a headless model\)"):
        tk.replace_head(model, 3)


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

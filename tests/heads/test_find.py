"""find_head on timm-, torchvision- and HF-like layouts."""

from __future__ import annotations

import logging

import pytest
from torch import nn

import transferkit as tk
from tests.heads._models import HFLike, TimmLike, vgg_like, vit_like


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


def test_find_head_sees_a_shared_module_at_its_last_place() -> None:
    # failed before the fix: definition order counted a reused module only where it first
    # appeared, so the last Linear *run* (``tied``, again at the end) lost to ``middle``
    tied, middle = nn.Linear(4, 4), nn.Linear(4, 4)
    model = nn.Sequential(tied, nn.ReLU(), middle, nn.ReLU(), tied)
    assert tk.find_head(model) == ("4", tied)
    # and a head attribute that aliases an earlier child is still found by its name
    net = nn.Module()
    net.neck = nn.Identity()
    net.fc = net.neck
    assert tk.find_head(net)[0] == "fc"


def two_heads(order: list[str]) -> nn.Module:
    layers = {
        "fc": nn.Linear(16, 6),  # a projection ...
        "classifier": nn.Linear(6, 3),  # ... feeding the classifier
        "head": nn.Sequential(nn.ReLU(), nn.Linear(6, 3)),
    }
    model = nn.Module()
    model.body = nn.Linear(4, 16)
    for name in order:
        setattr(model, name, layers[name])
    return model


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (["fc", "classifier"], "classifier"),
        (["classifier", "fc"], "classifier"),
        (["fc", "head"], "head.1"),
    ],
)
def test_find_head_skips_a_projection_that_feeds_the_classifier(
    order: list[str], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    # failed before the fix: ``fc`` comes first in the names looked up, so the projection
    # Linear(16, 6) was "the head" and replace_head(model, n) replaced it, silently
    with caplog.at_level(logging.WARNING, logger="transferkit.heads"):
        assert tk.find_head(two_heads(order))[0] == expected
    assert caplog.text == ""


def test_find_head_warns_when_several_head_like_attributes_are_ambiguous(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Module()
    model.fc, model.head = nn.Linear(3, 3), nn.Linear(3, 3)
    with caplog.at_level(logging.WARNING, logger="transferkit.heads"):
        assert tk.find_head(model)[0] == "fc"
    assert "['fc', 'head'] are all head-like; using 'fc'" in caplog.text

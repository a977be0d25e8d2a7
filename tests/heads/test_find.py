"""find_head on timm-, torchvision- and HF-like layouts."""

from __future__ import annotations

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

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

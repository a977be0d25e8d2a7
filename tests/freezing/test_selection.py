"""Selecting what freeze/unfreeze touch: glob patterns, until, types, suggestions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transferkit as tk
from tests.freezing._helpers import make_net


def test_glob_patterns_select_parameters_and_modules() -> None:
    net = make_net()
    assert tk.freeze(net, include="*.bias") == [
        n for n, _ in net.named_parameters() if n.endswith(".bias")
    ]
    net = make_net()
    assert tk.freeze(net, include="features.[01]") == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
    ]


def test_until_freezes_children_in_definition_order() -> None:
    net = make_net()
    frozen = tk.freeze(net, until="neck")
    assert frozen == [n for n, _ in net.named_parameters() if not n.startswith("fc")]
    net = make_net()
    frozen = tk.freeze(net, until="features.1")
    assert frozen == [
        "features.0.weight",
        "features.0.bias",
        "features.1.weight",
        "features.1.bias",
    ]
    assert not net.train().features[1].training and net.features[5].training


def test_until_includes_parameters_held_directly_by_modules_on_the_path() -> None:
    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.head = nn.Linear(4, 2)

    net = TokenNet()
    assert tk.freeze(net, until="blocks.0") == ["cls_token", "blocks.0.weight", "blocks.0.bias"]


def test_types_selects_parameters_by_module_class() -> None:
    net = make_net()
    frozen = tk.freeze(net, types=nn.BatchNorm2d)
    assert frozen == [
        "features.1.weight",
        "features.1.bias",
        "features.5.weight",
        "features.5.bias",
    ]
    with pytest.raises(ValueError, match="no module of type LayerNorm"):
        tk.freeze(net, types=nn.LayerNorm)
    with pytest.raises(TypeError, match="types"):
        tk.freeze(net, types="BatchNorm2d")  # type: ignore[arg-type]


def test_unknown_patterns_raise_with_suggestions() -> None:
    net = make_net()
    with pytest.raises(ValueError, match=r"include: pattern 'featurs' .*did you mean 'features'"):
        tk.freeze(net, include="featurs")
    # a typo in exclude would silently freeze the head: it must raise too
    with pytest.raises(ValueError, match=r"exclude: pattern 'fcc' .*did you mean 'fc'"):
        tk.freeze(net, exclude="fcc")
    with pytest.raises(ValueError, match=r"until: 'neckk' is not a module .*'neck'"):
        tk.freeze(net, until="neckk")
    with pytest.raises(ValueError, match="bn: expected one of"):
        tk.freeze(net, bn="off")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="include"):
        tk.freeze(net, include=3)  # type: ignore[arg-type]
    assert all(p.requires_grad for p in net.parameters())  # nothing changed on error

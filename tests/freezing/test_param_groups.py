"""param_groups: trainable parameters only, no-decay split, layer-wise lr decay."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import transferkit as tk
from tests.freezing._helpers import make_net


def test_optimizer_from_param_groups_holds_no_frozen_parameter() -> None:
    net = make_net()
    tk.freeze(net, until="neck")
    groups = tk.param_groups(net, 0.01, weight_decay=0.05)
    optimizer = torch.optim.SGD(groups, lr=123.0, momentum=0.9)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p.requires_grad for p in held)
    assert {id(p) for p in held} == {id(p) for p in net.fc.parameters()}
    for group in optimizer.param_groups:  # the optimizer default (123.0) never leaks in
        assert group["lr"] == 0.01
        assert group["weight_decay"] == (0.0 if "no_decay" in group["name"] else 0.05)


def test_param_groups_no_decay_for_bias_and_norm_layers() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)  # "norm" by type, not by name
            self.LayerNorm = nn.LayerNorm(4)  # HF naming
            self.bn = nn.BatchNorm1d(4)

    net = nn.Sequential(Block(), nn.Linear(4, 2))
    groups = tk.param_groups(net, 0.1, weight_decay=0.01)
    names = {id(p): n for n, p in net.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.01 for p in g["params"]}
    assert decay == {"0.proj.weight", "1.weight"}
    assert no_decay == set(names.values()) - decay
    assert all(set(g) == {"params", "lr", "weight_decay", "name"} for g in groups)
    with_decay = tk.param_groups(net, 0.1, layer_decay=0.5)
    assert all(g["layer_decay"] == 0.5 for g in with_decay)


def test_param_groups_layer_decay_gives_real_per_group_lr() -> None:
    net = make_net()
    groups = tk.param_groups(net, 1.0, layer_decay=0.5)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {
        "features.0": 0.5**5,
        "features.0 (no_decay)": 0.5**5,
        "features.1 (no_decay)": 0.5**4,
        "features.4": 0.5**3,
        "features.4 (no_decay)": 0.5**3,
        "features.5 (no_decay)": 0.5**2,
        "neck.1": 0.5,
        "neck.1 (no_decay)": 0.5,
        "fc": 1.0,
        "fc (no_decay)": 1.0,
    }
    # any torch scheduler scales the per-group values; nothing is applied twice
    optimizer = torch.optim.SGD(groups, lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)
    optimizer.step()
    scheduler.step()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * lrs[group["name"]])


@given(
    lr=st.floats(1e-5, 1.0),
    decay=st.floats(0.05, 1.0),
    frozen_until=st.sampled_from([None, "features.1", "features.5", "neck"]),
)
def test_param_groups_partition_trainable_parameters(
    lr: float, decay: float, frozen_until: str | None
) -> None:
    net = make_net()
    if frozen_until is not None:
        tk.freeze(net, until=frozen_until)
    groups = tk.param_groups(net, lr, layer_decay=decay, weight_decay=0.1)
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in net.parameters() if p.requires_grad)
    head = [g for g in groups if g["name"].startswith("fc")]
    assert all(g["lr"] == lr for g in head)
    # lr never increases going down the network
    lrs = [g["lr"] for g in groups]
    assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(lrs))


def test_param_groups_validates_arguments() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="lr"):
        tk.param_groups(net, 0.0)
    with pytest.raises(ValueError, match="layer_decay"):
        tk.param_groups(net, 0.1, layer_decay=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        tk.param_groups(net, 0.1, weight_decay=-1.0)
    tk.freeze(net)
    with pytest.raises(ValueError, match="no trainable parameter"):
        tk.param_groups(net, 0.1)

"""freeze/unfreeze: frozen parameters never move, returned names, wrappers, train_bn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transferkit as tk
from tests.freezing._helpers import bn_layers, make_net, snapshot, train_steps


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_frozen_params_and_bn_stats_bit_identical_after_train_with_momentum_and_decay(
    task: tk.datasets.DomainTask, optimizer_name: str
) -> None:
    net = make_net()
    frozen = tk.freeze(net, exclude=["fc*"])
    assert frozen and all(not n.startswith("fc") for n in frozen)
    before = snapshot(net)
    # hand EVERY parameter to the optimizer, as careless code does: frozen ones must not move
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1
        )
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.1)
    net.train()
    train_steps(net, optimizer, task.source_x, task.source_y, steps=10)
    after = snapshot(net)
    for key, value in before.items():
        if key.startswith("param:fc"):
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key  # params AND running stats
    assert all(not m.training for m in bn_layers(net))


def test_frozen_params_do_not_move_even_with_existing_momentum_buffers(
    task: tk.datasets.DomainTask,
) -> None:
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    train_steps(net, optimizer, task.source_x, task.source_y, steps=3)  # momentum exists now
    tk.freeze(net, exclude="fc")
    before = snapshot(net)
    train_steps(net, optimizer, task.source_x, task.source_y, steps=5)
    after = snapshot(net)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == ["param:fc.weight", "param:fc.bias"]


def test_freeze_returns_only_newly_frozen_names_in_model_order() -> None:
    net = make_net()
    first = tk.freeze(net, include="neck")
    assert first == ["neck.1.weight", "neck.1.bias"]
    second = tk.freeze(net, include=["neck", "fc"])
    assert second == ["fc.weight", "fc.bias"]
    assert tk.unfreeze(net) == ["neck.1.weight", "neck.1.bias", "fc.weight", "fc.bias"]


def test_policy_that_selects_nothing_raises() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="selects no parameter"):
        tk.freeze(net, include="fc", exclude="fc*")


def test_wrapped_models() -> None:
    net = make_net()
    assert tk.freeze(nn.DataParallel(net), include="fc") == ["fc.weight", "fc.bias"]
    assert not net.fc.weight.requires_grad
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        tk.freeze("net")  # type: ignore[arg-type]


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_freeze_train_bn_keeps_batchnorm_affine_trainable(
    task: tk.datasets.DomainTask, bn: str
) -> None:
    """fastai's train_bn=True: frozen backbone, BatchNorm weight/bias keep training; the
    bn policy still decides the running statistics."""
    net = make_net()
    frozen = tk.freeze(net, exclude="fc", bn=bn, train_bn=True)  # type: ignore[arg-type]
    bn_names = {f"features.{i}.{leaf}" for i in (1, 5) for leaf in ("weight", "bias")}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == bn_names | {"fc.weight", "fc.bias"}
    assert not bn_names & set(frozen)
    before = snapshot(net)
    train_steps(net, torch.optim.AdamW(tk.param_groups(net, 1e-2)), task.source_x, task.source_y)
    after = snapshot(net)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    stats = {k for k in moved if "running" in k or "num_batches" in k}
    assert {k for k in moved - stats} == {f"param:{n}" for n in bn_names | {"fc.weight", "fc.bias"}}
    assert bool(stats) == (bn == "train")


def test_freeze_train_bn_validates_and_default_freezes_batchnorm() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="train_bn"):
        tk.freeze(net, bn="frozen", train_bn=True)
    with pytest.raises(TypeError, match="train_bn"):
        tk.freeze(net, train_bn="yes")  # type: ignore[arg-type]
    tk.freeze(net, exclude="fc")
    assert not net.features[1].weight.requires_grad


def test_freeze_clears_stale_grads_so_adamw_leaves_frozen_weights_alone() -> None:
    # zero_grad(set_to_none=False) leaves zero-filled .grad tensors; AdamW steps every
    # parameter whose .grad is not None, so without freeze clearing .grad a frozen
    # weight would keep moving (decoupled weight decay and Adam momentum).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    tk.freeze(net, include="0")
    frozen = {n: p.detach().clone() for n, p in net[0].named_parameters()}
    head = net[2].weight.detach().clone()
    for _ in range(3):
        step()
    for name, param in net[0].named_parameters():
        assert torch.equal(param, frozen[name]), name
    assert not torch.equal(net[2].weight, head)  # the rest still trains
    assert net[0].weight.grad is None and net[0].bias.grad is None


@pytest.mark.slow
def test_linear_probe_on_pretrained_features_beats_chance_on_shifted_digits(
    task: tk.datasets.DomainTask,
) -> None:
    net = make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(6):
        train_steps(net, optimizer, task.source_x, task.source_y, steps=20, batch=64)
    tk.replace_head(net, 10)
    tk.freeze(net, exclude="fc")
    x, y = task.few_shot(10, seed=0)
    probe = torch.optim.Adam(tk.param_groups(net, 1e-2))
    before = snapshot(net)
    train_steps(net, probe, x, y, steps=60, batch=32)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(task.target_test_x).argmax(1) == task.target_test_y).float().mean())
    assert accuracy > 0.5
    assert all(torch.equal(v, snapshot(net)[k]) for k, v in before.items() if "fc." not in k)

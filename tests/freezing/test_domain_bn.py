"""Freezing, parameter groups and gradual unfreezing on models with domain-specific BatchNorm.

``tk.convert_domain_bn`` and ``tk.freeze`` are combined in either order; the shared affine
terms of a ``DomainSpecificBatchNorm`` are BatchNorm terms and must be treated as such.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import transferkit as tk

from ._helpers import make_net, snapshot


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _inner_bns(model: nn.Module) -> list[nn.Module]:
    return [
        norm
        for m in model.modules()
        if isinstance(m, tk.DomainSpecificBatchNorm)
        for norm in m.norms.values()
    ]


def _train_both_domains(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x_s = torch.randn(16, 1, 16, 16, generator=generator)
        x_t = torch.randn(16, 1, 16, 16, generator=generator) * 2 + 3
        y = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x_s), y)
        with tk.bn_domain(model, "target"):
            loss = loss + model(x_t).logsumexp(1).mean()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("affine", ["shared", "separate"])
def test_freeze_then_convert_domain_bn_keeps_the_backbone_frozen(affine: str) -> None:
    # failed before the fix with "shared": the shared affine terms were new trainable
    # parameters, so the "frozen" BatchNorm scale and shift trained
    net = make_net()
    tk.freeze(net, exclude="fc")
    tk.convert_domain_bn(net, affine=affine)  # type: ignore[arg-type]
    assert _trainable(net) == ["fc.weight", "fc.bias"]
    before = snapshot(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    _train_both_domains(net, optimizer)
    assert all(not norm.training for norm in _inner_bns(net))  # bn="eval" survives train()
    after = snapshot(net)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["param:fc.weight", "param:fc.bias"]


def test_convert_then_freeze_with_train_bn_keeps_the_shared_affine_terms_trainable() -> None:
    # failed before the fix: train_bn only knew BatchNorm owners, so the shared terms froze
    net = tk.convert_domain_bn(make_net())
    tk.freeze(net, exclude="fc", bn="eval", train_bn=True)
    assert _trainable(net) == [
        "features.1.weight",
        "features.1.bias",
        "features.5.weight",
        "features.5.bias",
        "fc.weight",
        "fc.bias",
    ]
    plain = make_net()
    tk.freeze(plain, exclude="fc", bn="eval", train_bn=True)
    assert _trainable(net) == _trainable(plain)  # the same policy with or without DSBN


def test_freeze_by_batchnorm_type_on_a_domain_bn_model_freezes_affine_and_statistics() -> None:
    # failed before the fix: types=nn.BatchNorm2d froze the per-domain statistics but left
    # the shared scale and shift training; types=DomainSpecificBatchNorm did the opposite
    for types in (nn.BatchNorm2d, tk.DomainSpecificBatchNorm):
        net = tk.convert_domain_bn(make_net())
        frozen = tk.freeze(net, types=types)
        assert frozen == [
            "features.1.weight",
            "features.1.bias",
            "features.5.weight",
            "features.5.bias",
        ], types
        net.train()
        assert all(not norm.training for norm in _inner_bns(net)), types
        assert tk.unfreeze(net, types=types) == frozen
        net.train()
        assert all(norm.training for norm in _inner_bns(net)), types


def test_param_groups_gives_no_weight_decay_to_the_shared_batchnorm_scale() -> None:
    # failed before the fix: "features.1.weight" of a DSBN got weight decay, unlike the
    # weight of the BatchNorm2d it replaced
    def decayed(model: nn.Module) -> list[str]:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = tk.param_groups(model, 0.1, weight_decay=0.05)
        return [names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]

    converted = tk.convert_domain_bn(make_net())
    assert decayed(converted) == decayed(make_net())
    assert not any(n.startswith(("features.1.", "features.5.")) for n in decayed(converted))


@pytest.mark.parametrize("affine", ["shared", "separate"])
def test_layer_decay_gives_a_domain_bn_layer_the_depth_of_the_layer_it_replaced(
    affine: str,
) -> None:
    # failed before the fix with "separate": the per-domain copies of one layer became two
    # blocks at two depths (source and target scale got different lrs) and every block
    # below them lost one more factor of layer_decay
    def lrs(model: nn.Module) -> dict[str, float]:
        names = {id(p): n for n, p in model.named_parameters()}
        groups = tk.param_groups(model, 1.0, layer_decay=0.5)
        return {names[id(p)]: g["lr"] for g in groups for p in g["params"]}

    plain = lrs(make_net())
    converted = lrs(tk.convert_domain_bn(make_net(), affine=affine))  # type: ignore[arg-type]
    for name, lr in converted.items():
        layer = name.split(".norms.")[0] if ".norms." in name else name.rsplit(".", 1)[0]
        assert lr == plain[f"{layer}.{name.rsplit('.', 1)[1]}"], name
    summary = tk.trainable_summary(tk.convert_domain_bn(make_net(), affine=affine))  # type: ignore[arg-type]
    assert "norms.source" not in summary


def test_gradual_unfreezing_train_bn_trains_the_shared_terms_of_a_domain_bn_model() -> None:
    # failed before the fix: the shared terms were frozen and left out of the optimizer
    net = tk.convert_domain_bn(make_net())
    optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.1)
    tk.GradualUnfreezing(net, ["neck", "features"], optimizer, lr=0.01, train_bn=True)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    shared = [m for m in net.modules() if isinstance(m, tk.DomainSpecificBatchNorm)]
    for layer in shared:
        assert layer.weight is not None and layer.bias is not None
        assert layer.weight.requires_grad and layer.bias.requires_grad
        assert id(layer.weight) in held and id(layer.bias) in held
    assert not net.features[0].weight.requires_grad


@pytest.mark.parametrize("affine", ["shared", "separate"])
def test_frozen_batchnorm_converted_stays_frozen_and_unfreezes_per_domain(affine: str) -> None:
    # failed before the fix: FrozenBatchNorm layers were skipped by convert_domain_bn and
    # unfreeze turned them into plain BatchNorm2d shared by both domains, silently
    net = make_net()
    tk.freeze(net, exclude="fc", bn="frozen")
    x = torch.randn(8, 1, 16, 16)
    net.eval()
    expected = net(x)
    tk.convert_domain_bn(net, affine=affine)  # type: ignore[arg-type]
    layers = [m for m in net.modules() if isinstance(m, tk.DomainSpecificBatchNorm)]
    assert len(layers) == 2
    assert all(isinstance(n, tk.freezing.FrozenBatchNorm) for n in _inner_bns(net))
    assert _trainable(net) == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(net(x), expected)  # same function while frozen
    tk.unfreeze(net)
    assert all(type(n) is nn.BatchNorm2d for n in _inner_bns(net))
    source_before = net.features[1].norms["source"].running_mean.clone()
    net.train()
    with tk.bn_domain(net, "target"):
        net(x * 2 + 3)
    assert torch.equal(net.features[1].norms["source"].running_mean, source_before)
    assert not torch.equal(net.features[1].norms["target"].running_mean, source_before)


def test_convert_then_freeze_eval_keeps_every_domains_statistics_through_training() -> None:
    net = tk.convert_domain_bn(make_net())
    tk.freeze(net, until="features.5")
    stats = {k: v for k, v in snapshot(net).items() if "running" in k}
    assert len(stats) == 8  # mean and var of two layers, two domains
    optimizer = torch.optim.SGD(tk.param_groups(net, 0.1), lr=0.1)
    _train_both_domains(net, optimizer)
    after = snapshot(net)
    assert all(torch.equal(v, after[k]) for k, v in stats.items())
    tk.unfreeze(net)
    _train_both_domains(net, torch.optim.SGD(net.parameters(), lr=0.1))
    after = snapshot(net)
    assert all(not torch.equal(v, after[k]) for k, v in stats.items())


@pytest.mark.parametrize(
    ("scheduler", "bn", "affine"),
    [
        ("one_cycle", "eval", "shared"),
        ("lambda", "eval", "shared"),
        ("lambda", "frozen", "separate"),
    ],
)
def test_gradual_unfreezing_on_domain_bn_resumes_like_an_uninterrupted_run(
    scheduler: str, bn: str, affine: str
) -> None:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, object, tk.GradualUnfreezing]:
        net = tk.convert_domain_bn(make_net(), affine=affine)  # type: ignore[arg-type]
        tk.freeze(net, exclude="fc", bn=bn)  # type: ignore[arg-type]
        optimizer = torch.optim.SGD(
            tk.param_groups(net, 0.1, weight_decay=1e-3, layer_decay=0.5), lr=0.1, momentum=0.9
        )
        sched: torch.optim.lr_scheduler.LRScheduler = (
            tk.schedules.one_cycle(optimizer, 12)
            if scheduler == "one_cycle"
            else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
        )
        stages = ["neck", "features.5", "features.4", ["features.0", "features.1"]]
        schedule = tk.GradualUnfreezing(
            net,
            stages,
            optimizer,
            every=2,
            scheduler=sched,
            bn=bn,  # type: ignore[arg-type]
        )
        return net, optimizer, sched, schedule

    def run(parts: tuple[nn.Module, torch.optim.Optimizer, object, tk.GradualUnfreezing]) -> None:
        net, optimizer, sched, schedule = parts
        _train_both_domains(net, optimizer, steps=1)
        sched.step()  # type: ignore[attr-defined]
        schedule.step()

    full = build()
    for _ in range(10):
        run(full)
    part = build()
    for _ in range(5):
        run(part)
    state = copy.deepcopy(
        [part[0].state_dict(), part[1].state_dict(), part[2].state_dict(), part[3].state_dict()]  # type: ignore[attr-defined]
    )
    resumed = build()
    resumed[3].load_state_dict(state[3])
    resumed[0].load_state_dict(state[0])
    resumed[1].load_state_dict(state[1])
    resumed[2].load_state_dict(state[2])  # type: ignore[attr-defined]
    for _ in range(5):
        run(resumed)
    ids = [id(p) for g in resumed[1].param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter in two groups
    assert {id(p) for p in resumed[0].parameters()} == set(ids)  # none left out
    assert [g["lr"] for g in resumed[1].param_groups] == [g["lr"] for g in full[1].param_groups]
    expected = snapshot(full[0])
    for key, value in snapshot(resumed[0]).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)

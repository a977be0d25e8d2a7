"""GradualUnfreezing: stages, resume, inherited optimizer settings, train_bn."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import transferkit as tk
from tests.freezing._helpers import make_net, snapshot, train_steps

STAGES: list[str | list[str]] = ["neck", ["features.4", "features.5"], "features.[01]"]


STAGE_PREFIXES = [("neck.",), ("features.4.", "features.5."), ("features.0.", "features.1.")]


def test_gradual_unfreezing_stage_params_start_changing_exactly_at_their_step(
    task: tk.datasets.DomainTask,
) -> None:
    net = make_net()
    optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    schedule = tk.GradualUnfreezing(net, STAGES, optimizer, lr=0.05)
    first_change: dict[str, int] = {}
    for epoch in range(4):
        before = snapshot(net)
        train_steps(net, optimizer, task.source_x, task.source_y, steps=2)
        after = snapshot(net)
        for key in before:
            if key.startswith("param:") and not torch.equal(before[key], after[key]):
                first_change.setdefault(key[len("param:") :], epoch)
        schedule.step()
    for name, _ in net.named_parameters():
        expected = 0
        for stage, prefixes in enumerate(STAGE_PREFIXES):
            if name.startswith(prefixes):
                expected = stage + 1
        assert first_change.get(name) == expected, name
    assert schedule.done and len(optimizer.param_groups) == 1 + 2 * 3
    assert [g["lr"] for g in optimizer.param_groups] == [0.05] * 7


def test_gradual_unfreezing_every_n_steps_and_lr_per_stage() -> None:
    net = make_net()
    optimizer = torch.optim.Adam(net.fc.parameters(), lr=1e-3)
    schedule = tk.GradualUnfreezing(net, STAGES, optimizer, every=2, lr=[1e-3, 1e-4, 1e-5])
    assert schedule.step() == []
    assert schedule.step() == ["neck.1.weight", "neck.1.bias"]
    assert schedule.step() == []
    schedule.step()
    assert {g["lr"] for g in optimizer.param_groups[1:]} == {1e-3, 1e-4}
    assert schedule.state_dict() == {"steps": 4, "stage": 2}


def frozen_set(model: nn.Module) -> tuple[list[str], list[str]]:
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    bns = [
        n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and "train" in vars(m)
    ]
    return names, bns


def test_gradual_unfreezing_resume_reproduces_frozen_set_and_training(
    task: tk.datasets.DomainTask, tmp_path: Path
) -> None:
    def build() -> tuple[nn.Module, torch.optim.Optimizer, tk.GradualUnfreezing]:
        net = make_net()
        optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.05, momentum=0.9)
        return net, optimizer, tk.GradualUnfreezing(net, STAGES, optimizer, lr=0.02)

    net, optimizer, schedule = build()
    for _ in range(2):
        train_steps(net, optimizer, task.source_x, task.source_y, steps=2)
        schedule.step()
    checkpoint = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    expected_frozen = frozen_set(net)
    assert expected_frozen[0] and len(expected_frozen[0]) < len(list(net.parameters()))

    resumed, resumed_optimizer, resumed_schedule = build()
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(loaded["model"])
    resumed_schedule.load_state_dict(loaded["schedule"])
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    assert frozen_set(resumed) == expected_frozen
    assert resumed_schedule.state_dict() == schedule.state_dict()

    for model, opt, sched in (
        (net, optimizer, schedule),
        (resumed, resumed_optimizer, resumed_schedule),
    ):
        for _ in range(2):
            train_steps(model, opt, task.source_x, task.source_y, steps=2)
            sched.step()
    for key, value in snapshot(net).items():
        assert torch.equal(value, snapshot(resumed)[key]), key


def test_gradual_unfreezing_validates_arguments() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="stages"):
        tk.GradualUnfreezing(net, [])
    with pytest.raises(TypeError, match="stages: expected a list of patterns"):
        tk.GradualUnfreezing(net, "neck")  # type: ignore[arg-type]
    # The pattern is reported under the argument the user passed (it said "include").
    with pytest.raises(ValueError, match="stages\\[0\\]: pattern 'nek'"):
        tk.GradualUnfreezing(net, ["nek"])
    with pytest.raises(ValueError, match="stages\\[1\\]: pattern 'nek'"):
        tk.GradualUnfreezing(net, ["neck", ["fc", "nek"]])
    with pytest.raises(TypeError, match="stages\\[0\\]: expected a glob pattern"):
        tk.GradualUnfreezing(net, [None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="lr: expected one value per stage"):
        tk.GradualUnfreezing(net, ["neck"], lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="every"):
        tk.GradualUnfreezing(net, ["neck"], every=0)
    schedule = tk.GradualUnfreezing(net, ["neck"])
    with pytest.raises(ValueError, match="state"):
        schedule.load_state_dict({"steps": 1, "stage": 5})


def test_gradual_unfreezing_warns_when_optimizer_already_holds_stage_params(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="transferkit.freezing"):
        schedule = tk.GradualUnfreezing(net, ["neck"], optimizer, lr=0.01)
    assert "already holds 2 parameter tensors" in caplog.text
    schedule.step()
    assert len(optimizer.param_groups) == 1  # nothing added twice
    assert net.neck[1].weight.requires_grad


def settings_by_parameter(
    model: nn.Module, groups: list[dict[str, object]]
) -> dict[str, tuple[float, float]]:
    """``name -> (lr, weight_decay)`` of the group holding each parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, tuple[float, float]] = {}
    for group in groups:
        lr = float(group.get("initial_lr", group["lr"]))  # type: ignore[arg-type]
        for p in group["params"]:  # type: ignore[attr-defined]
            assert names[id(p)] not in out, "a parameter in two groups"
            out[names[id(p)]] = (lr, float(group["weight_decay"]))  # type: ignore[arg-type]
    return out


def unfreeze_all(net: nn.Module, schedule: tk.GradualUnfreezing) -> None:
    while not schedule.done:
        schedule.step()
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_gradual_unfreezing_inherits_weight_decay_and_no_decay_split_with_adamw(
    weight_decay: float,
) -> None:
    """A stage used to get AdamW's default weight_decay=0.01 whatever the user chose."""
    net = make_net()
    tk.freeze(net, exclude="fc")
    optimizer = torch.optim.AdamW(tk.param_groups(net, 1e-3, weight_decay=weight_decay))
    schedule = tk.GradualUnfreezing(net, STAGES, optimizer, lr=1e-4)
    unfreeze_all(net, schedule)
    got = settings_by_parameter(net, optimizer.param_groups)
    for name, (_, wd) in got.items():
        plain = name.endswith("bias") or name.startswith(("features.1.", "features.5."))
        assert wd == (0.0 if plain else weight_decay), name
    assert optimizer.defaults["weight_decay"] == 0.01  # the default never leaked in


def test_gradual_unfreezing_inherits_weight_decay_from_a_plain_optimizer() -> None:
    net = make_net()
    optimizer = torch.optim.AdamW(net.fc.parameters(), lr=1e-3, weight_decay=0.2)
    schedule = tk.GradualUnfreezing(net, STAGES, optimizer, lr=1e-4)
    unfreeze_all(net, schedule)
    got = settings_by_parameter(net, optimizer.param_groups)
    assert got["neck.1.weight"] == (1e-4, 0.2) and got["neck.1.bias"] == (1e-4, 0.0)
    assert got["features.1.weight"][1] == 0.0  # BatchNorm weight: no decay
    explicit = tk.GradualUnfreezing(
        make_net(),
        ["neck"],
        torch.optim.AdamW(make_net().fc.parameters(), weight_decay=0.2),
        weight_decay=0.3,
    )
    explicit.step()
    assert [g["weight_decay"] for g in explicit.optimizer.param_groups[1:]] == [0.3, 0.0]  # type: ignore[union-attr]


@given(
    lr=st.floats(1e-5, 1.0),
    layer_decay=st.floats(0.05, 1.0),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.05]),
    explicit=st.booleans(),
)
@settings(max_examples=15, deadline=None)
def test_gradual_unfreezing_layer_decay_gives_param_groups_of_the_unfrozen_model(
    lr: float, layer_decay: float, weight_decay: float, explicit: bool
) -> None:
    """Invariant: after the last stage the optimizer holds, parameter by parameter, the lr
    and weight decay that param_groups gives the fully unfrozen model."""
    net = make_net()
    tk.freeze(net, exclude="fc")
    groups = tk.param_groups(net, lr, layer_decay=layer_decay, weight_decay=weight_decay)
    optimizer = torch.optim.AdamW(groups)
    schedule = tk.GradualUnfreezing(
        net, STAGES, optimizer, lr=lr if explicit else None, layer_decay=layer_decay
    )
    unfreeze_all(net, schedule)
    want = tk.param_groups(net, lr, layer_decay=layer_decay, weight_decay=weight_decay)
    got = settings_by_parameter(net, optimizer.param_groups)
    expected = settings_by_parameter(net, want)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-9), name


def test_gradual_unfreezing_continues_a_layer_decay_pattern_it_finds() -> None:
    """Groups at two depths with lrs falling by one factor: the stages continue it."""
    net = make_net()
    tk.freeze(net, exclude=["fc", "neck"])
    optimizer = torch.optim.AdamW(tk.param_groups(net, 0.1, layer_decay=0.5, weight_decay=0.01))
    schedule = tk.GradualUnfreezing(net, ["features.[45]", "features.[01]"], optimizer)
    unfreeze_all(net, schedule)
    got = settings_by_parameter(net, optimizer.param_groups)
    want = settings_by_parameter(net, tk.param_groups(net, 0.1, layer_decay=0.5, weight_decay=0.01))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-9), name
    assert got["features.0.weight"] == pytest.approx((0.1 * 0.5**5, 0.01))


def test_gradual_unfreezing_layer_decay_validates_arguments() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="layer_decay"):
        tk.GradualUnfreezing(net, ["neck"], layer_decay=0.0)
    with pytest.raises(ValueError, match="layer_decay"):
        tk.GradualUnfreezing(net, ["neck"], layer_decay=1.5)
    with pytest.raises(ValueError, match="lr: with layer_decay"):
        tk.GradualUnfreezing(net, ["neck", "features"], lr=[0.1, 0.01], layer_decay=0.5)
    with pytest.raises(TypeError, match="train_bn"):
        tk.GradualUnfreezing(net, ["neck"], train_bn=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train_bn"):
        tk.GradualUnfreezing(net, ["neck"], bn="frozen", train_bn=True)


def test_gradual_unfreezing_train_bn_trains_batchnorm_of_frozen_stages_from_the_start(
    task: tk.datasets.DomainTask,
) -> None:
    net = make_net()
    tk.freeze(net, exclude="fc")  # the usual first step; train_bn makes BN trainable again
    optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.05, momentum=0.9)
    schedule = tk.GradualUnfreezing(net, STAGES, optimizer, lr=0.05, bn="train", train_bn=True)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(net.features[1].weight) in held and id(net.features[0].weight) not in held
    before = snapshot(net)
    train_steps(net, optimizer, task.source_x, task.source_y, steps=2)
    after = snapshot(net)
    assert not torch.equal(before["param:features.1.weight"], after["param:features.1.weight"])
    assert torch.equal(before["param:features.0.weight"], after["param:features.0.weight"])
    groups = len(optimizer.param_groups)
    unfreeze_all(net, schedule)
    assert len(optimizer.param_groups) == groups + 3 * 2  # BatchNorm groups not added twice


@pytest.mark.parametrize("scheduler", [None, "OneCycleLR", "CyclicLR"])
def test_gradual_unfreezing_continues_layer_decay_of_param_groups_built_on_the_head_alone(
    scheduler: str | None,
) -> None:
    """The common recipe: freeze all but the head, AdamW(param_groups(..., layer_decay=d)),
    GradualUnfreezing without layer_decay=: the stages continue lr * d**depth (the head
    alone shows one depth, so the factor is read from the groups' layer_decay key)."""
    net = make_net()
    tk.freeze(net, exclude="fc")
    optimizer = torch.optim.AdamW(tk.param_groups(net, 0.1, layer_decay=0.7, weight_decay=0.05))
    built: torch.optim.lr_scheduler.LRScheduler | None = None
    peaks = [g["lr"] for g in optimizer.param_groups]
    if scheduler == "OneCycleLR":
        built = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=10)
    elif scheduler == "CyclicLR":
        # failed before the fix: the stages' peaks were read off the groups' lower bound
        # (initial_lr), 100x too small here
        built = torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=1e-3, max_lr=peaks, step_size_up=4, cycle_momentum=False
        )
    schedule = tk.GradualUnfreezing(net, STAGES, optimizer, scheduler=built)
    unfreeze_all(net, schedule)
    names = {id(p): n for n, p in net.named_parameters()}

    def peak(index: int, group: dict[str, object]) -> object:
        if isinstance(built, torch.optim.lr_scheduler.CyclicLR):
            return built.max_lrs[index]
        return group["lr" if built is None else "max_lr"]

    got = {
        names[id(p)]: (peak(i, g), g["weight_decay"])
        for i, g in enumerate(optimizer.param_groups)
        for p in g["params"]
    }
    want = settings_by_parameter(net, tk.param_groups(net, 0.1, layer_decay=0.7, weight_decay=0.05))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-9), name

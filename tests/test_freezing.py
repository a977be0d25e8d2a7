from __future__ import annotations

import copy
import io
import itertools
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import transferkit as tk
from tests._dist_utils import run_distributed
from transferkit.freezing import FrozenBatchNorm

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Tiny models: one thread avoids OpenMP spin-waiting on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def task() -> tk.datasets.DomainTask:
    return tk.datasets.digits(tk.datasets.rotate(30), seed=0)


def make_net(seed: int = 0, num_classes: int = 10) -> tk.models.SmallCNN:
    torch.manual_seed(seed)
    return tk.models.SmallCNN(num_classes=num_classes, width=8, feature_dim=32)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 10,
    batch: int = 32,
) -> None:
    model.train()
    for step in range(steps):
        start = (step * batch) % (len(x) - batch)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(
            model(x[start : start + batch]), y[start : start + batch]
        )
        loss.backward()
        optimizer.step()


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm))]


# --------------------------------------------------------------------------- acceptance


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


def test_bn_train_policy_lets_statistics_move(task: tk.datasets.DomainTask) -> None:
    net = make_net()
    tk.freeze(net, exclude="fc", bn="train")
    before = snapshot(net)
    optimizer = torch.optim.SGD(tk.param_groups(net, 0.1), momentum=0.9)
    train_steps(net, optimizer, task.source_x, task.source_y, steps=10)
    after = snapshot(net)
    bn_mean = "buffer:features.1.running_mean"
    assert not torch.equal(before[bn_mean], after[bn_mean])
    assert int(after["buffer:features.1.num_batches_tracked"]) == 10
    for key in before:  # the affine terms stay frozen all the same
        if key.startswith("param:") and not key.startswith("param:fc"):
            assert torch.equal(before[key], after[key]), key


def test_bn_frozen_policy_replaces_layers_and_keeps_statistics(
    task: tk.datasets.DomainTask,
) -> None:
    net = make_net()
    reference_out = copy.deepcopy(net).eval()(task.source_x[:8])
    frozen = tk.freeze(net, exclude="fc", bn="frozen")
    assert "features.1.weight" in frozen
    assert all(isinstance(m, FrozenBatchNorm) for m in bn_layers(net))
    assert [n for n, p in net.named_parameters()] == [
        "features.0.weight",
        "features.0.bias",
        "features.4.weight",
        "features.4.bias",
        "neck.1.weight",
        "neck.1.bias",
        "fc.weight",
        "fc.bias",
    ]
    net.train()
    torch.testing.assert_close(net(task.source_x[:8]), reference_out, rtol=0, atol=0)
    before = snapshot(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    train_steps(net, optimizer, task.source_x, task.source_y, steps=10)
    after = snapshot(net)
    assert all(torch.equal(before[k], after[k]) for k in before if "fc." not in k)


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


# --------------------------------------------------------------------------- BN eval policy


def test_frozen_batchnorm_stays_in_eval_mode_through_train_eval_calls() -> None:
    net = make_net()
    tk.freeze(net, include="features")
    bn = net.features[1]
    for _ in range(2):
        net.train()
        assert not bn.training and net.training and net.neck.training
        net.eval()
        assert not bn.training
    bn.training = True  # even when forced by hand, the pre-hook re-checks before forward
    net.train()
    stats = bn.running_mean.clone()
    net(torch.randn(4, 1, 16, 16))
    assert torch.equal(stats, bn.running_mean)
    assert not bn.training


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_eval_policy_survives_copy_and_serialisation(how: str) -> None:
    net = make_net()
    tk.freeze(net, exclude="fc")
    if how == "deepcopy":
        clone = copy.deepcopy(net)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(net))
    else:
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    clone.train()
    bn = clone.features[1]
    assert not bn.training
    stats = bn.running_var.clone()
    clone(torch.randn(4, 1, 16, 16))
    assert torch.equal(stats, bn.running_var)
    # the copy's policy acts on the copy, not on the original
    net.eval()
    clone.features[1].train()
    assert clone.features[1].training is False


def test_eval_policy_survives_state_dict_round_trip(tmp_path: Path) -> None:
    net = make_net()
    net(torch.randn(8, 1, 16, 16))  # non-trivial statistics
    tk.freeze(net, exclude="fc")
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    restored = make_net(seed=1)
    tk.freeze(restored, exclude="fc")
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.train()
    stats = restored.features[1].running_mean.clone()
    assert torch.equal(stats, net.features[1].running_mean)
    restored(torch.randn(4, 1, 16, 16))
    assert torch.equal(stats, restored.features[1].running_mean)


def test_unfreeze_restores_batchnorm_behaviour() -> None:
    net = make_net()
    tk.freeze(net)
    assert tk.unfreeze(net, include="features.1") == ["features.1.weight", "features.1.bias"]
    bn = net.features[1]
    assert "train" not in vars(bn) and not bn._forward_pre_hooks
    net.train()
    assert bn.training
    stats = bn.running_mean.clone()
    net(torch.randn(4, 1, 16, 16))
    assert not torch.equal(stats, bn.running_mean)
    assert not net.features[5].training  # the other frozen BN keeps its policy


def test_unfreeze_converts_frozen_batchnorm_back_with_same_values() -> None:
    net = make_net()
    net(torch.randn(8, 1, 16, 16))
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    tk.freeze(net, bn="frozen")
    assert sorted(net.state_dict()) == sorted(reference)
    names = tk.unfreeze(net)
    assert len(names) == len(reference) - 6  # every parameter; buffers are not parameters
    assert type(net.features[1]) is nn.BatchNorm2d and net.features[1].weight.requires_grad
    for key, value in net.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.BatchNorm1d(3), (5, 3)),
        (nn.BatchNorm1d(3), (5, 3, 4)),
        (nn.BatchNorm2d(3), (5, 3, 4, 4)),
        (nn.BatchNorm3d(3), (5, 3, 2, 2, 2)),
        (nn.SyncBatchNorm(3), (5, 3, 4, 4)),
        (nn.BatchNorm2d(3, affine=False), (5, 3, 4, 4)),
    ],
)
def test_frozen_batchnorm_matches_numpy_reference(
    layer: nn.modules.batchnorm._BatchNorm, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        if layer.affine:
            layer.weight.uniform_(0.5, 2)
            layer.bias.uniform_(-1, 1)
    frozen = FrozenBatchNorm.from_batchnorm(layer).train()
    x = torch.randn(*shape)
    out = frozen(x).numpy()
    view = (1, 3) + (1,) * (len(shape) - 2)
    mean = layer.running_mean.numpy().reshape(view)
    var = layer.running_var.numpy().reshape(view)
    expected = (x.numpy() - mean) / np.sqrt(var + layer.eps)
    if layer.affine:
        expected = expected * layer.weight.detach().numpy().reshape(view)
        expected = expected + layer.bias.detach().numpy().reshape(view)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert sorted(frozen.state_dict()) == sorted(layer.state_dict())
    back = frozen.to_batchnorm()
    assert type(back) is type(layer)
    for key, value in layer.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_frozen_batchnorm_rejects_wrong_input_rank() -> None:
    frozen = FrozenBatchNorm.from_batchnorm(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="BatchNorm2d expects a 4-D"):
        frozen(torch.randn(2, 3))


def test_bn_frozen_falls_back_to_eval_for_subclasses(caplog: pytest.LogCaptureFixture) -> None:
    class BatchNormAct(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    net = nn.Sequential(nn.Conv2d(1, 3, 3), BatchNormAct(3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(2, 1, 5, 5))
    with caplog.at_level(logging.WARNING, logger="transferkit.freezing"):
        tk.freeze(net, exclude="3", bn="frozen")
    assert "BatchNorm subclass" in caplog.text
    assert type(net[1]) is BatchNormAct
    net.train()
    assert not net[1].training


# --------------------------------------------------------------------------- selection


def test_freeze_returns_only_newly_frozen_names_in_model_order() -> None:
    net = make_net()
    first = tk.freeze(net, include="neck")
    assert first == ["neck.1.weight", "neck.1.bias"]
    second = tk.freeze(net, include=["neck", "fc"])
    assert second == ["fc.weight", "fc.bias"]
    assert tk.unfreeze(net) == ["neck.1.weight", "neck.1.bias", "fc.weight", "fc.bias"]


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


# --------------------------------------------------------------------------- summary


def test_trainable_summary_counts_match_parameters() -> None:
    net = make_net()
    tk.freeze(net, exclude="fc", bn="eval")
    table = tk.trainable_summary(net)
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.fc.parameters())
    last_rows = table.splitlines()[-2:]
    assert last_rows[0].split()[1:] == [f"{total:,}", f"{trainable:,}"]
    assert last_rows[1] == f"trainable share: {100 * trainable / total:.1f}%"
    bn_row = next(line for line in table.splitlines() if line.startswith("features.1 "))
    assert bn_row.split()[-1] == "eval"
    tk.unfreeze(net)
    tk.freeze(net, include="features.5", bn="frozen")
    assert "frozen" in tk.trainable_summary(net)


# --------------------------------------------------------------------------- param groups


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


def test_param_groups_splits_repeated_blocks_of_a_transformer_like_model() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.Embedding(5, 8)
            self.encoder = Encoder()

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = Backbone()
            self.classifier = nn.Linear(8, 2)

    groups = tk.param_groups(Model(), 1.0, layer_decay=0.5, no_decay=())
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("bert.embeddings", 0.5**4),
        ("bert.encoder.layer.0", 0.5**3),
        ("bert.encoder.layer.1", 0.5**2),
        ("bert.encoder.layer.2", 0.5),
        ("classifier", 1.0),
    ]


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


# --------------------------------------------------------------------------- gradual unfreezing

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


# --------------------------------------------------------------------------- end to end


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


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int) -> dict[str, object]:
    torch.manual_seed(0)
    net = tk.models.SmallCNN(num_classes=4, width=4, feature_dim=16)
    tk.freeze(net, exclude="fc")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = nn.parallel.DistributedDataParallel(net)  # find_unused_parameters=False
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    gen = torch.Generator().manual_seed(rank)
    model.train()
    for _ in range(3):
        x = torch.randn(6, 1, 12, 12, generator=gen)
        y = torch.randint(0, 4, (6,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    error = ""
    try:
        tk.freeze(model, include="fc")
    except ValueError as exc:
        error = str(exc)
    after = net.state_dict()
    return {
        "frozen_unchanged": all(torch.equal(before[k], after[k]) for k in before if "fc." not in k),
        "fc_moved": not torch.equal(before["fc.weight"], after["fc.weight"]),
        "fc": after["fc.weight"].clone(),
        "error": error,
    }


@pytest.mark.distributed
def test_frozen_model_trains_under_ddp_without_unused_parameter_error(tmp_path: Path) -> None:
    results = run_distributed(_ddp_worker, tmp_path)
    for result in results:
        assert result["frozen_unchanged"] and result["fc_moved"]
        assert "find_unused_parameters=False" in str(result["error"])
    torch.testing.assert_close(results[0]["fc"], results[1]["fc"], rtol=0, atol=0)


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


# --------------------------------------------------------------------------- inherited settings


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


# --------------------------------------------------------------------------- train_bn


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


@pytest.mark.parametrize("scheduler", [None, "OneCycleLR"])
def test_gradual_unfreezing_continues_layer_decay_of_param_groups_built_on_the_head_alone(
    scheduler: str | None,
) -> None:
    """The common recipe: freeze all but the head, AdamW(param_groups(..., layer_decay=d)),
    GradualUnfreezing without layer_decay=: the stages continue lr * d**depth (the head
    alone shows one depth, so the factor is read from the groups' layer_decay key)."""
    net = make_net()
    tk.freeze(net, exclude="fc")
    optimizer = torch.optim.AdamW(tk.param_groups(net, 0.1, layer_decay=0.7, weight_decay=0.05))
    built = None
    if scheduler is not None:
        peaks = [g["lr"] for g in optimizer.param_groups]
        built = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=10)
    schedule = tk.GradualUnfreezing(net, STAGES, optimizer, scheduler=built)
    unfreeze_all(net, schedule)
    key = "lr" if built is None else "max_lr"
    names = {id(p): n for n, p in net.named_parameters()}
    got = {
        names[id(p)]: (g[key], g["weight_decay"])
        for g in optimizer.param_groups
        for p in g["params"]
    }
    want = settings_by_parameter(net, tk.param_groups(net, 0.1, layer_decay=0.7, weight_decay=0.05))
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-9), name

"""FrozenBatchNorm and the BatchNorm policies of freeze/unfreeze (eval, train, frozen)."""

from __future__ import annotations

import copy
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk
from tests.freezing._helpers import bn_layers, make_net, snapshot, train_steps
from transferkit.freezing import FrozenBatchNorm


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


def test_public_objects_and_pickled_models_name_the_package_not_its_private_files() -> None:
    # pickles, reprs and feature-cache fingerprints stay as before the package split
    for name in tk.freezing.__all__:
        assert getattr(tk.freezing, name).__module__ == "transferkit.freezing", name
    net = make_net()
    tk.freeze(net, include="features.[01]")  # "eval" policy: a hook and train() in the pickle
    tk.freeze(net, include="features.[45]", bn="frozen")
    payload = pickle.dumps(net)
    assert b"FrozenBatchNorm" in payload and b"_EvalOnlyTrain" in payload
    assert b"transferkit.freezing._" not in payload
    clone = pickle.loads(payload)
    assert not clone.train().features[1].training

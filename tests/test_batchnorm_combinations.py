"""AdaBN combined with what users wrap and freeze: DSBN, frozen layers, compile, DDP."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk
from tests._dist_utils import run_distributed
from tests.test_batchnorm import _net as _bn_net


def _net() -> nn.Sequential:
    return _bn_net(final_bn=False)


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_adapt_batchnorm_on_dsbn_outside_bn_domain_warns_that_source_is_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # failed before the fix: the source statistics were silently replaced by target ones
    net = tk.convert_domain_bn(_net())
    target = torch.randn(16, 2, 5, 5) * 2 + 3
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        tk.adapt_batchnorm(net, target)
    assert "bn_domain" in caplog.text and "'source'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        with tk.bn_domain(net, "target"):
            tk.adapt_batchnorm(net, target)
        with tk.bn_domain(net, "source"):  # chosen on purpose: no warning
            tk.adapt_batchnorm(net, target)
    assert caplog.text == ""


def test_adapt_batchnorm_on_a_frozen_model_says_its_layers_are_frozen() -> None:
    # failed before the fix: "no BatchNorm layer with running statistics", while the
    # model has two, frozen by tk.freeze
    for bn in ("eval", "frozen"):
        net = _net()
        tk.freeze(net, exclude="7", bn=bn)  # type: ignore[arg-type]
        before = _stats(net)
        with pytest.raises(ValueError, match="2 BatchNorm layers .* are frozen"):
            tk.adapt_batchnorm(net, torch.randn(8, 2, 5, 5))
        after = _stats(net)
        assert all(torch.equal(v, after[k]) for k, v in before.items())
    for model in (nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4)), _no_stats()):
        with pytest.raises(ValueError, match="no BatchNorm layer .*GroupNorm"):
            tk.adapt_batchnorm(model, torch.randn(8, 2, 5, 5))


def _no_stats() -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False))


def test_adapt_batchnorm_on_a_frozen_dsbn_model_keeps_every_domain_and_flag() -> None:
    net = tk.convert_domain_bn(_net())
    tk.freeze(net, until="1")  # the first DSBN layer keeps its statistics
    flags = [p.requires_grad for p in net.parameters()]
    before = _stats(net)
    net.train()
    with tk.bn_domain(net, "target"):
        tk.adapt_batchnorm(net, torch.randn(16, 2, 5, 5) + 4)
    after = _stats(net)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["5.norms.target.running_mean", "5.norms.target.running_var"]
    assert flags == [p.requires_grad for p in net.parameters()]
    assert not any(m.training for m in net[1].norms.values())  # bn="eval" kept
    assert net.training and net[5].norms["target"].training and net[3].training


def _counting_backend() -> tuple[list[int], Any]:
    calls: list[int] = []

    def backend(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        calls.append(1)
        return graph.forward

    return calls, backend


def test_adapt_batchnorm_runs_the_module_inside_wrappers() -> None:
    # failed before the fix for torch.compile: the pass compiled new graphs (BatchNorm in
    # training mode, with hooks), which later calls of the compiled model recompile
    target = torch.randn(32, 2, 5, 5) * 3 + 1
    reference = _net()
    tk.adapt_batchnorm(reference, target, batch_size=8)
    calls, backend = _counting_backend()
    net = _net().eval()
    compiled = torch.compile(net, backend=backend)
    compiled(target[:4])
    compiled_before = len(calls)
    assert tk.adapt_batchnorm(compiled, target, batch_size=8) is compiled
    assert len(calls) == compiled_before  # nothing compiled by the pass
    wrapped = _net()
    tk.adapt_batchnorm(nn.DataParallel(wrapped), target, batch_size=8)
    for model in (net, wrapped):
        after = _stats(model)
        for key, value in _stats(reference).items():
            torch.testing.assert_close(after[key], value)
    assert not net.training


def _adabn_shard(rank: int, world: int, data: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    ddp = nn.parallel.DistributedDataParallel(net)
    shard = data[rank::world]
    tk.adapt_batchnorm(ddp, shard, batch_size=4)
    return {k: v.clone() for k, v in net[0].state_dict().items()}


@pytest.mark.distributed
def test_adapt_batchnorm_under_ddp_merges_the_statistics_of_every_shard(
    tmp_path: Path,
) -> None:
    # failed before the fix: every rank kept the statistics of its own shard only
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(30, 3, generator=generator, dtype=torch.float64).float() * 2 + 1
    data[1::2] += 5  # the shards differ
    results = run_distributed(_adabn_shard, tmp_path, data)
    values = data.double().numpy()
    for result in results:
        np.testing.assert_allclose(result["running_mean"].numpy(), values.mean(0), rtol=1e-5)
        np.testing.assert_allclose(result["running_var"].numpy(), values.var(0, ddof=1), rtol=1e-5)
        assert int(result["num_batches_tracked"]) == 8  # 4 batches on each rank
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def _adabn_tiny_shard(rank: int, world: int) -> dict[str, str]:
    from datetime import timedelta

    import torch.distributed as dist

    # a short timeout: without the fix rank 0 waited in the merge for rank 1, which had
    # already raised (a hang under the default 30-minute timeout)
    group = dist.new_group(timeout=timedelta(seconds=15))
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    before = net[0].running_mean.clone()
    ddp = nn.parallel.DistributedDataParallel(net, process_group=group)
    shard = torch.randn(8 if rank == 0 else 1, 3)  # rank 1: one sample, not enough
    try:
        tk.adapt_batchnorm(ddp, shard, batch_size=4)
        outcome = "no error"
    except (ValueError, RuntimeError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    unchanged = torch.equal(net[0].running_mean, before)
    return {"outcome": outcome, "unchanged": str(unchanged)}


@pytest.mark.distributed
def test_adapt_batchnorm_under_ddp_fails_on_every_rank_when_one_shard_is_too_small(
    tmp_path: Path,
) -> None:
    # failed before the fix: rank 1 raised alone and rank 0 waited in the merge until
    # the process group timed out
    results = run_distributed(_adabn_tiny_shard, tmp_path)
    assert results[1]["outcome"].startswith("ValueError") and "target_data" in results[1]["outcome"]
    assert results[0]["outcome"].startswith("RuntimeError")
    assert "other rank" in results[0]["outcome"]
    assert all(r["unchanged"] == "True" for r in results)


def test_adapt_batchnorm_handles_momentum_none_bn3d_and_sync_batchnorm() -> None:
    data = torch.randn(12, 3, 2, 2, 2) * 2 + 1
    values = data.double().transpose(0, 1).reshape(3, -1)
    for layer in (nn.BatchNorm3d(3, momentum=None), nn.SyncBatchNorm(3)):
        net = nn.Sequential(copy.deepcopy(layer))
        tk.adapt_batchnorm(net, data, batch_size=4)
        norm = net[0]
        assert norm.momentum == layer.momentum and norm.training == layer.training
        torch.testing.assert_close(norm.running_mean.double(), values.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.running_var.double(), values.var(1), rtol=1e-5, atol=1e-6)


def _surgery_through_ddp(rank: int, world: int) -> dict[str, str]:
    errors = {}
    for name, surgery in (
        ("convert", tk.convert_domain_bn),
        ("head", lambda model: tk.replace_head(model, 5)),
    ):
        net = tk.models.SmallCNN(num_classes=3, width=4, feature_dim=16)
        ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        try:
            surgery(ddp)
            errors[name] = ""
        except ValueError as exc:
            errors[name] = str(exc)
        errors[f"{name} untouched"] = str(isinstance(net.features[1], nn.BatchNorm2d))
    return errors


@pytest.mark.distributed
def test_convert_domain_bn_and_replace_head_refuse_a_ddp_wrapper(tmp_path: Path) -> None:
    # failed before the fix: both worked through the wrapper, and the new parameters
    # (shared affine terms, the new head) were never synchronised: ranks drift silently
    # with find_unused_parameters=True, the setting freezing through DDP asks for
    for errors in run_distributed(_surgery_through_ddp, tmp_path):
        assert "before wrapping" in errors["convert"], errors
        assert "before wrapping" in errors["head"], errors
        assert errors["convert untouched"] == errors["head untouched"] == "True"


class _BatchNormReLU(nn.BatchNorm2d):
    """A BatchNorm subclass that acts after the affine step, like timm's BatchNormAct2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("affine", ["shared", "separate"])
def test_convert_domain_bn_keeps_the_output_of_a_batchnorm_subclass(affine: str) -> None:
    # failed before the fix with "shared": the shared scale and shift were applied after
    # the subclass's activation (relu(bn(x)) * w + b instead of relu(bn(x) * w + b))
    torch.manual_seed(0)
    layer = _BatchNormReLU(4)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
        layer.running_mean.uniform_(-1.0, 1.0)
        layer.running_var.uniform_(0.5, 2.0)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), layer)
    x = torch.randn(8, 2, 3, 3)
    expected = net.eval()(x)
    tk.convert_domain_bn(net, affine=affine)  # type: ignore[arg-type]
    torch.testing.assert_close(net(x), expected)
    with tk.bn_domain(net, "target"):
        torch.testing.assert_close(net(x), expected)
    parameters = dict(net.named_parameters())
    assert sorted(parameters) == (
        ["0.bias", "0.weight", "1.bias", "1.weight"]
        if affine == "shared"
        else sorted(
            ["0.bias", "0.weight"]
            + [f"1.norms.{d}.{w}" for d in ("source", "target") for w in ("bias", "weight")]
        )
    )
    # one set of affine terms learns from both domains; statistics stay per domain
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = net(x).sum()
    with tk.bn_domain(net, "target"):
        loss = loss + net(x * 3 + 1).sum()
    loss.backward()
    optimizer.step()
    source, target = net[1].norms["source"], net[1].norms["target"]
    assert not torch.equal(source.running_mean, target.running_mean)
    if affine == "shared":
        assert source.weight is target.weight is net[1].weight
    restored = copy.deepcopy(net)
    restored.load_state_dict(net.state_dict())
    net.eval(), restored.eval()
    for domain in ("source", "target"):
        with tk.bn_domain(net, domain), tk.bn_domain(restored, domain):
            torch.testing.assert_close(restored(x), net(x))

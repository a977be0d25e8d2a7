from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import transferkit as tk
from tests._dist_utils import run_distributed
from transferkit import distributed as D


def test_single_process_helpers_are_trivial() -> None:
    x = torch.randn(3, 2)
    assert D.all_gather(x) is x
    assert D.get_rank() == 0
    assert D.get_world_size() == 1
    assert not D.is_distributed()


def test_all_gather_rejects_scalars_and_non_tensors() -> None:
    with pytest.raises(ValueError, match="x: expected a tensor with a batch dimension"):
        D.all_gather(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        D.all_gather([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(("length", "world"), [(0, 2), (5, 2), (7, 3), (2, 4), (100, 7)])
def test_shard_indices_cover_range_without_padding(length: int, world: int) -> None:
    shards = [list(D.shard_indices(length, r, world)) for r in range(world)]
    assert [i for shard in shards for i in shard] == list(range(length))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_indices_validates_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(10, 2, 2)


def test_unwrap_model_handles_nested_wrappers() -> None:
    net = nn.Linear(2, 2)
    assert D.unwrap_model(nn.DataParallel(nn.DataParallel(net))) is net
    assert D.unwrap_model(net) is net
    with pytest.raises(TypeError, match="model"):
        D.unwrap_model("net")  # type: ignore[arg-type]


# ----------------------------------------------------------------- real processes
SIZES = (3, 5)  # uneven per-rank batches


def _full_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    total = sum(SIZES)
    return torch.randn(total, 4, generator=gen), torch.randn(total, 4, generator=gen) + 0.5


def _discrepancy(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A nonlinear whole-batch statistic (a biased MMD with a Gaussian kernel)."""

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / 4.0)

    return k(source, source).mean() + k(target, target).mean() - 2 * k(source, target).mean()


def _gather_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    source, target = _full_batch()
    start = sum(SIZES[:rank])
    stop = start + SIZES[rank]
    torch.manual_seed(1)
    net = nn.Linear(4, 3)
    model = nn.parallel.DistributedDataParallel(net)
    f_s = model(source[start:stop])
    f_t = model(target[start:stop])
    gathered_s = D.all_gather(f_s)
    loss = _discrepancy(gathered_s, D.all_gather(f_t))
    loss.backward()
    return {
        "gathered": gathered_s.detach(),
        "loss": loss.detach(),
        "weight_grad": net.weight.grad.detach().clone(),
        "bias_grad": net.bias.grad.detach().clone(),
    }


@pytest.mark.distributed
def test_gathered_loss_and_ddp_gradients_equal_full_batch(tmp_path: Path) -> None:
    results = run_distributed(_gather_worker, tmp_path)
    source, target = _full_batch()
    torch.manual_seed(1)
    net = nn.Linear(4, 3)
    reference = _discrepancy(net(source), net(target))
    reference.backward()
    for result in results:
        torch.testing.assert_close(result["gathered"], net(source).detach())
        torch.testing.assert_close(result["loss"], reference.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result["weight_grad"], net.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result["bias_grad"], net.bias.grad, rtol=1e-5, atol=1e-7)


def _per_rank_worker(rank: int, world: int) -> torch.Tensor:
    source, target = _full_batch()
    start = sum(SIZES[:rank])
    stop = start + SIZES[rank]
    return _discrepancy(source[start:stop], target[start:stop]).detach()


@pytest.mark.distributed
def test_per_rank_estimate_differs_from_global(tmp_path: Path) -> None:
    per_rank = run_distributed(_per_rank_worker, tmp_path)
    source, target = _full_batch()
    global_value = _discrepancy(source, target)
    # without gathering each rank estimates from its own slice only: a different number
    assert all(abs(float(v) - float(global_value)) > 1e-3 for v in per_rank)


def test_top_level_exposes_module() -> None:
    assert tk.distributed.all_gather is D.all_gather

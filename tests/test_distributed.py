from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
def test_gathered_loss_and_ddp_gradients_equal_full_batch(
    spawned: tuple[list[dict[str, Any]], Path],
) -> None:
    results = [r["gather"] for r in spawned[0]]
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
def test_per_rank_estimate_differs_from_global(
    spawned: tuple[list[dict[str, Any]], Path],
) -> None:
    per_rank = [r["per_rank"] for r in spawned[0]]
    source, target = _full_batch()
    global_value = _discrepancy(source, target)
    # without gathering each rank estimates from its own slice only: a different number
    assert all(abs(float(v) - float(global_value)) > 1e-3 for v in per_rank)


def test_shutdown_needs_a_process_group_and_a_valid_settle_time() -> None:
    with pytest.raises(RuntimeError, match="shutdown: no process group is initialised"):
        D.shutdown()
    with pytest.raises(ValueError, match="settle: expected a finite value >= 0"):
        D.shutdown(settle=-0.1)
    with pytest.raises(ValueError, match="settle: expected a finite value >= 0"):
        D.shutdown(settle=float("nan"))
    with pytest.raises(TypeError, match="settle: expected a number"):
        D.shutdown(settle="1")  # type: ignore[arg-type]


def _ddp_then_shutdown(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4) + rank).sum().backward()
        optimizer.step()
    weight = model.module.weight.detach().clone()
    del model, optimizer
    D.shutdown(settle=0.01)
    return {"weight": weight, "still_distributed": D.is_distributed()}


@pytest.mark.distributed
def test_shutdown_ends_a_ddp_run_on_every_rank(tmp_path: Path) -> None:
    results = run_distributed(_ddp_then_shutdown, tmp_path)
    assert [r["still_distributed"] for r in results] == [False, False]
    torch.testing.assert_close(results[0]["weight"], results[1]["weight"])  # replicas agree


def _mean_teacher_of_ddp(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    model = nn.parallel.DistributedDataParallel(net)
    teacher = tk.ModelEMA(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 4) + rank).pow(2).mean().backward()
        optimizer.step()
        teacher.update(model)
        seen.append(net[0].weight.detach().clone())
    keys = sorted(teacher.module.state_dict())
    teacher.train()
    teacher(torch.randn(8, 4))  # no collective inside: the copy is not a DDP module
    return {
        "keys": keys,
        "plain_keys": sorted(net.state_dict()),
        "is_ddp": isinstance(teacher.module, nn.parallel.DistributedDataParallel),
        "weight": teacher.module[0].weight.clone(),
        "seen": torch.stack(seen),
    }


@pytest.mark.distributed
def test_model_ema_of_a_ddp_model_averages_the_network_inside(tmp_path: Path) -> None:
    results = run_distributed(_mean_teacher_of_ddp, tmp_path)
    for result in results:
        assert not result["is_ddp"]
        assert result["keys"] == result["plain_keys"]  # loads into the plain network
        seen = result["seen"]
        # decay 0.5 with the warm-up: d = 0, 0.5, 0.5
        expected = 0.5 * (0.5 * seen[0] + 0.5 * seen[1]) + 0.5 * seen[2]
        torch.testing.assert_close(result["weight"], expected)
    torch.testing.assert_close(results[0]["weight"], results[1]["weight"])  # ranks agree


def test_top_level_exposes_module() -> None:
    assert tk.distributed.all_gather is D.all_gather


# ----------------------------------------------------------- gathered losses (real mmd)
LOSSES = ("mmd-unbiased", "mmd-biased", "coral")


def _loss(name: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "coral":
        return tk.losses.coral(source, target)
    estimator = name.split("-")[1]
    return tk.losses.mmd(source, target, estimator=estimator)  # type: ignore[arg-type]


def _real_losses_worker(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    source, target = _full_batch(seed=3)
    source, target = source.double(), target.double()
    start = sum(SIZES[:rank])
    stop = start + SIZES[rank]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in LOSSES:
        torch.manual_seed(1)
        net = nn.Linear(4, 3).double()
        model = nn.parallel.DistributedDataParallel(net)
        loss = _loss(
            name,
            D.all_gather(model(source[start:stop])),
            D.all_gather(model(target[start:stop])),
        )
        loss.backward()
        out[name] = {
            "loss": loss.detach(),
            "weight_grad": net.weight.grad.detach().clone(),
            "bias_grad": net.bias.grad.detach().clone(),
        }
        # per-rank (not gathered) estimate, for comparison
        out[name]["local"] = _loss(name, net(source[start:stop]), net(target[start:stop])).detach()
    return out


@pytest.mark.distributed
def test_gathered_mmd_and_coral_equal_full_batch_value_and_gradients(
    spawned: tuple[list[dict[str, Any]], Path],
) -> None:
    results = [r["losses"] for r in spawned[0]]
    source, target = _full_batch(seed=3)
    source, target = source.double(), target.double()
    for name in LOSSES:
        torch.manual_seed(1)
        net = nn.Linear(4, 3).double()
        reference = _loss(name, net(source), net(target))
        reference.backward()
        assert net.weight.grad is not None and net.bias.grad is not None
        for result in results:
            got = result[name]
            torch.testing.assert_close(got["loss"], reference.detach(), rtol=0, atol=1e-6)
            torch.testing.assert_close(got["weight_grad"], net.weight.grad, rtol=0, atol=1e-6)
            torch.testing.assert_close(got["bias_grad"], net.bias.grad, rtol=0, atol=1e-6)
            # without the gather each rank sees only its slice: a different estimate
            assert abs(float(got["local"]) - float(reference.detach())) > 1e-4


# ------------------------------------------------- freezing and DANN through DDP wrappers
def _params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _digits_batches(rank: int, world: int, steps: int) -> list[tuple[torch.Tensor, ...]]:
    task = tk.datasets.digits("rotate", size=12)
    xs, ys, xt = task.source_x, task.source_y, task.target_x
    s_idx = D.shard_indices(min(len(xs), 8 * world * steps), rank, world)
    t_idx = D.shard_indices(min(len(xt), 8 * world * steps), rank, world)
    return [
        (
            xs[s_idx][i * 8 : (i + 1) * 8],
            ys[s_idx][i * 8 : (i + 1) * 8],
            xt[t_idx][i * 8 : (i + 1) * 8],
        )
        for i in range(steps)
    ]


class _WithFeatures(nn.Module):
    """The DDP-friendly DANN network: one forward returns logits and features."""

    def __init__(self, net: tk.models.SmallCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.forward_features(x)
        return self.net.fc(features), features


def _ddp_training_worker(rank: int, world: int) -> dict[str, object]:
    out: dict[str, object] = {}
    batches = _digits_batches(rank, world, steps=6)
    # 1. frozen backbone: every parameter trainable at wrap time, frozen through the wrapper
    torch.manual_seed(0)
    net = tk.models.SmallCNN(num_classes=10, width=4, feature_dim=16)
    model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    frozen = tk.freeze(model, exclude="fc")  # same pattern as on the bare model
    out["frozen_names"] = frozen
    backbone_before = _params(net.features).clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for x, y, _ in batches[:5]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    out["backbone_unchanged"] = torch.equal(backbone_before, _params(net.features))
    out["fc"] = _params(net.fc).clone()

    # 2. gradual unfreezing through the wrapper: all ranks unfreeze at the same step
    torch.manual_seed(0)
    net = tk.models.SmallCNN(num_classes=10, width=4, feature_dim=16)
    model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    optimizer = torch.optim.SGD(net.fc.parameters(), lr=0.05)
    schedule = tk.GradualUnfreezing(model, ["neck", "features"], optimizer, every=2, lr=0.05)
    frozen_sets: list[list[str]] = []
    for x, y, _ in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        schedule.step()
        frozen_sets.append([n for n, p in net.named_parameters() if not p.requires_grad])
    out["frozen_sets"] = frozen_sets
    out["gradual_params"] = _params(net).clone()

    # 3. DANN: backbone and adversarial criterion each wrapped in DDP
    torch.manual_seed(0)
    net = tk.models.SmallCNN(num_classes=10, width=4, feature_dim=16)
    criterion = tk.DomainAdversarialLoss(tk.DomainDiscriminator(16, hidden=16))
    model = nn.parallel.DistributedDataParallel(_WithFeatures(net))
    adversary = nn.parallel.DistributedDataParallel(criterion)
    optimizer = torch.optim.SGD([*model.parameters(), *adversary.parameters()], lr=0.05)
    for x, y, xt in batches[:3]:
        optimizer.zero_grad()
        logits, features = model(torch.cat([x, xt]))
        loss = nn.functional.cross_entropy(logits[: len(x)], y)
        loss = loss + adversary(features[: len(x)], features[len(x) :])
        loss.backward()
        optimizer.step()
    out["dann_params"] = torch.cat([_params(net), _params(criterion)]).clone()

    # 4. clear errors for wrappers that cannot work
    errors: list[str] = []
    torch.manual_seed(0)
    static = nn.parallel.DistributedDataParallel(tk.models.SmallCNN(num_classes=10, width=4))
    try:
        tk.freeze(static, exclude="fc")
    except ValueError as exc:
        errors.append(str(exc))
    partial_net = tk.models.SmallCNN(num_classes=10, width=4)
    tk.freeze(partial_net, exclude="fc")
    partial = nn.parallel.DistributedDataParallel(partial_net, find_unused_parameters=True)
    try:
        tk.GradualUnfreezing(partial, ["neck"])
    except ValueError as exc:
        errors.append(str(exc))
    out["errors"] = errors
    return out


@pytest.mark.distributed
def test_freezing_gradual_unfreezing_and_dann_through_ddp(
    spawned: tuple[list[dict[str, Any]], Path],
) -> None:
    results = [r["training"] for r in spawned[0]]
    bare = tk.models.SmallCNN(num_classes=10, width=4, feature_dim=16)
    expected_frozen = [n for n, _ in bare.named_parameters() if not n.startswith("fc.")]
    for result in results:
        assert result["frozen_names"] == expected_frozen  # no "module." prefix
        assert result["backbone_unchanged"]
        neck = [n for n in expected_frozen if n.startswith("neck.")]
        sets = result["frozen_sets"]
        assert sets[0] == expected_frozen  # nothing unfrozen after one step
        assert sets[1] == [n for n in expected_frozen if n not in neck]  # step 2: neck
        assert sets[3] == [] and sets[5] == []  # step 4: features
        assert "find_unused_parameters=False" in result["errors"][0]
        assert "trainable when DDP was built" in result["errors"][1]
    first, second = results
    assert first["frozen_sets"] == second["frozen_sets"]  # all ranks unfreeze together
    for key in ("fc", "gradual_params", "dann_params"):
        # DDP keeps the replicas bit-identical: the (un)frozen sets agree on every rank
        assert torch.equal(first[key], second[key]), key


# ----------------------------------------------------------------- sharded extraction
def _extraction_inputs() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    net = tk.models.SmallCNN(num_classes=3, width=4, feature_dim=8)
    gen = torch.Generator().manual_seed(5)
    return net, torch.randn(11, 1, 12, 12, generator=gen), torch.arange(11)  # 11: uneven


def _extraction_cases(x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    return {
        "tensor": x,
        "array": x.numpy(),
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=3),
    }


def _flat(result: object, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(result, tuple):
        flat = _flat(result[0], prefix)
        flat[f"{prefix}/labels"] = torch.from_numpy(np.array(result[1]))
        return flat
    if isinstance(result, dict):
        return {f"{prefix}/{k}": torch.from_numpy(np.array(v)) for k, v in result.items()}
    return {prefix: torch.from_numpy(np.array(result))}


def _extraction_worker(rank: int, world: int, cache: str) -> dict[str, object]:
    net, x, y = _extraction_inputs()
    out: dict[str, object] = {}
    for name, data in _extraction_cases(x, y).items():
        result = tk.extract_features(net, data, layers=["features", "neck"], batch_size=4)
        out.update(_flat(result, name))
    first = tk.extract_features(net, TensorDataset(x, y), layers="neck", cache=cache)
    out.update(_flat(first, "cache-first"))
    out["header-after-barrier"] = (Path(cache) / "header.json").exists()
    again = tk.extract_features(net, TensorDataset(x, y), layers="neck", cache=cache)
    out.update(_flat(again, "cache-again"))
    try:
        tk.extract_features(net, DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True))
        out["shuffle-error"] = ""
    except ValueError as exc:
        out["shuffle-error"] = str(exc)
    try:  # only rank 0 checks the cache; its error must reach every rank (no deadlock)
        shuffled = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True)
        tk.extract_features(net, shuffled, cache=Path(cache).with_name("cache2"))
        out["cache-error"] = ""
    except ValueError as exc:
        out["cache-error"] = str(exc)
    return out


# ------------------------------------------- one spawn for every multi-process check
def _all_checks_worker(rank: int, world: int, cache: str) -> dict[str, object]:
    """Spawning costs seconds per process, so every real-process check shares one run."""
    return {
        "gather": _gather_worker(rank, world),
        "per_rank": _per_rank_worker(rank, world),
        "losses": _real_losses_worker(rank, world),
        "training": _ddp_training_worker(rank, world),
        "extraction": _extraction_worker(rank, world, cache),
    }


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("distributed")
    results = run_distributed(_all_checks_worker, tmp, str(tmp / "cache"))
    return results, tmp / "cache"


@pytest.mark.distributed
def test_sharded_extraction_equals_single_process_on_every_rank(
    spawned: tuple[list[dict[str, Any]], Path],
) -> None:
    results, cache = spawned
    net, x, y = _extraction_inputs()
    expected: dict[str, torch.Tensor] = {}
    for name, data in _extraction_cases(x, y).items():
        single = tk.extract_features(
            net, data, layers=["features", "neck"], batch_size=4, progress=False
        )
        expected.update(_flat(single, name))
    reference = tk.extract_features(net, TensorDataset(x, y), layers="neck", progress=False)
    expected.update(_flat(reference, "cache-first"))
    expected.update(_flat(reference, "cache-again"))
    for result in results:
        got = result["extraction"]
        for key, value in expected.items():
            # batches are cut differently per shard: equal up to float rounding
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert got["header-after-barrier"]  # rank 0 finished writing before anyone went on
        assert "cannot be sharded in dataset order" in got["shuffle-error"]
        assert "RandomSampler" in got["cache-error"]
    # the cache that rank 0 wrote is a complete, valid cache for a single-process run too
    cached = tk.extract_features(
        net, TensorDataset(x, y), layers="neck", cache=cache, progress=False
    )
    torch.testing.assert_close(
        _flat(cached, "c")["c"], expected["cache-first"], rtol=1e-5, atol=1e-6
    )


# ------------------------------------------------------- extraction options, one process
def test_extract_features_channels_last_matches_default_and_restores_model() -> None:
    net, x, _ = _extraction_inputs()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plain = tk.extract_features(net, x, layers=["features", "neck"], progress=False)
    fast = tk.extract_features(
        net, x, layers=["features", "neck"], progress=False, channels_last=True
    )
    for key in plain:
        np.testing.assert_allclose(fast[key], plain[key], rtol=1e-5, atol=1e-6)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name])
        assert value.is_contiguous()  # memory format restored
    with pytest.raises(TypeError, match="channels_last"):
        tk.extract_features(net, x, channels_last="yes")  # type: ignore[arg-type]


def test_extract_features_distributed_true_needs_a_process_group() -> None:
    net, x, _ = _extraction_inputs()
    with pytest.raises(ValueError, match="distributed: True needs an initialised"):
        tk.extract_features(net, x, distributed=True, progress=False)
    single = tk.extract_features(net, x, distributed=False, progress=False)
    np.testing.assert_array_equal(single, tk.extract_features(net, x, progress=False))

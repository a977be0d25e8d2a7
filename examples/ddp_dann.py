"""DANN on shifted digits with DistributedDataParallel, launched by ``torchrun``.

    torchrun --nproc_per_node=2 examples/ddp_dann.py            # gloo on CPU, nccl on GPU
    torchrun --nproc_per_node=2 examples/ddp_dann.py --smoke    # < 60 s; asserts the result
    python examples/ddp_dann.py --smoke                         # also runs as one process

Every rank trains on its own shard of the source and target data (a
``DistributedSampler`` each, reshuffled every epoch), so the global batch is
``nproc * --batch-size`` per domain. The network returns logits and features from ONE
forward (the DDP-friendly pattern: DDP sees every parameter used once per step), and the
``tk.DomainAdversarialLoss`` criterion, which owns the discriminator, is wrapped in its
own ``DistributedDataParallel``.

The DANN loss is a mean of per-sample terms: each rank's loss on its slice, followed by
DDP's gradient averaging, gives the gradient of the loss on the global batch, so no
gather is needed. ``--method mmd`` shows the other case: MMD is a statistic of the whole
batch, so the features are gathered with ``tk.distributed.all_gather`` (differentiable)
before ``tk.losses.mmd``. Both are compared with a source-only network trained with the
same recipe; rank 0 prints the target-test accuracy table (each rank scores its shard of
the test set and the counts are summed with ``all_reduce``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import transferkit as tk


class WithFeatures(nn.Module):
    """One forward returns ``(logits, features)``."""

    def __init__(self, net: tk.models.SmallCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.net.forward_features(x)
        return self.net.fc(features), features


def setup() -> torch.device:
    """Join the process group that torchrun describes (or stay a single process)."""
    if "RANK" not in os.environ:
        return tk.resolve_device("auto")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def loader(
    dataset: TensorDataset, batch: int, seed: int
) -> tuple[DataLoader[Any], DistributedSampler[Any]]:
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset,
        num_replicas=tk.distributed.get_world_size(),
        rank=tk.distributed.get_rank(),
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    return DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=True), sampler


def batches(data: DataLoader[Any], sampler: DistributedSampler[Any]) -> Iterator[list[Tensor]]:
    """An endless iterator over the loader, a new shuffle (same on all ranks) per epoch."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from data
        epoch += 1


def evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    """Target-test accuracy: each rank scores its shard, the counts are summed."""
    shard = tk.distributed.shard_indices(len(x))
    model.eval()
    with torch.inference_mode():
        logits, _ = model(x[shard.start : shard.stop].to(device))
        counts = torch.tensor(
            [float((logits.argmax(1).cpu() == y[shard.start : shard.stop]).sum()), len(shard)],
            device=device,
        )
    if tk.distributed.is_distributed():
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def train(
    method: str, task: tk.datasets.DomainTask, args: argparse.Namespace, device: torch.device
) -> tuple[float, Tensor]:
    """Train one network; return the target-test accuracy and the flattened parameters."""
    tk.seed_everything(args.seed)  # same initial weights on every rank (DDP also broadcasts)
    net = tk.models.SmallCNN(num_classes=task.num_classes, width=16).to(device)
    distributed = tk.distributed.is_distributed()

    def wrap(module: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(module) if distributed else module

    model = wrap(WithFeatures(net))
    schedule = tk.WarmStartSchedule(args.steps, alpha=10.0, hi=0.3 if method == "dann" else 1.0)
    params = list(model.parameters())
    criterion: nn.Module | None = None
    if method == "dann":
        discriminator = tk.DomainDiscriminator(net.feature_dim, hidden=256)
        adversarial = tk.DomainAdversarialLoss(discriminator, grl=tk.GradientReversal(schedule))
        criterion = wrap(adversarial.to(device))
        params += list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    annealing = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1.0 + 10.0 * step / args.steps) ** -0.75
    )
    source = batches(*loader(TensorDataset(task.source_x, task.source_y), args.batch_size, 0))
    target = batches(*loader(TensorDataset(task.target_x), args.batch_size, 1))
    model.train()
    for _ in range(args.steps):
        x_s, y_s = (t.to(device, non_blocking=True) for t in next(source))
        (x_t,) = (t.to(device, non_blocking=True) for t in next(target))
        if method == "source-only":
            logits, _ = model(x_s)
            loss: Tensor = nn.functional.cross_entropy(logits, y_s)
        else:
            logits, features = model(torch.cat([x_s, x_t]))
            f_s, f_t = features[: len(x_s)], features[len(x_s) :]
            loss = nn.functional.cross_entropy(logits[: len(x_s)], y_s)
            if criterion is not None:  # dann: per-sample terms, no gather needed
                loss = loss + criterion(f_s, f_t)
            else:  # mmd: a whole-batch statistic, estimated on the gathered global batch
                gathered_s = tk.distributed.all_gather(f_s)
                gathered_t = tk.distributed.all_gather(f_t)
                loss = loss + schedule.value * tk.losses.mmd(gathered_s, gathered_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        annealing.step()
        schedule.step()
    flat = torch.cat([p.detach().flatten().cpu() for p in net.parameters()])
    return evaluate(model, task.target_test_x, task.target_test_y, device), flat


def ranks_agree(flat: Tensor) -> bool:
    """Whether every rank holds bit-identical parameters (what DDP guarantees)."""
    if not tk.distributed.is_distributed():
        return True
    gathered: list[Tensor | None] = [None] * tk.distributed.get_world_size()
    dist.all_gather_object(gathered, flat)
    return all(g is not None and torch.equal(g, flat) for g in gathered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank and domain")
    parser.add_argument("--method", choices=("dann", "mmd"), default="dann")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="quick run that asserts the result")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small CNNs: one thread per process is fastest on CPU
    if args.smoke:
        args.steps = 400
    device = setup()
    rank, world = tk.distributed.get_rank(), tk.distributed.get_world_size()
    try:
        start = time.perf_counter()
        task = tk.datasets.digits(tk.datasets.rotate(35), size=16, seed=args.seed)
        rows = []
        agree = True
        for method in ("source-only", args.method):
            acc, flat = train(method, task, args, device)
            agree = agree and ranks_agree(flat)
            rows.append((method, acc))
        took = time.perf_counter() - start
        if rank == 0:
            backend = dist.get_backend() if tk.distributed.is_distributed() else "none"
            print(
                f"\nDANN with DDP: {world} process(es), backend {backend}, device {device}, "
                f"{args.steps} steps, global batch {world * args.batch_size} per domain"
            )
            print("| method | target-test accuracy |")
            print("|---|---|")
            for method, acc in rows:
                print(f"| {method} | {acc:.3f} |")
            print(f"parameters identical on every rank: {agree}")
            print(f"done in {took:.1f} s")
        if args.smoke:
            assert agree, "DDP replicas diverged"
            gain = rows[1][1] - rows[0][1]
            assert gain > 0.0, f"{args.method} should beat source-only, gain was {gain:.3f}"
    except BaseException:
        if tk.distributed.is_distributed():
            dist.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    if tk.distributed.is_distributed():
        tk.distributed.shutdown()  # barrier + a teardown that avoids gloo's exit race


if __name__ == "__main__":
    main()

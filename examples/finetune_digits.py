"""Fine-tuning recipes on few-shot shifted digits: which way of transferring works best?

Pretrain a small CNN on the labelled source digits, then transfer it to a shifted target
domain (the same digits classes under Gaussian pixel noise, std 0.3) where only 5 or 10
labelled samples per class exist. The classes do not change, so the transferred models
start from the pretrained classifier (for a new label set, ``tk.replace_head`` first).
Every recipe gets the same labelled samples and the same number of steps:

* scratch         -- a fresh network trained on the few target labels only;
* linear probe    -- pretrained backbone frozen (BatchNorm statistics included), head trains;
* fine-tune       -- everything trains with one learning rate;
* LP-FT           -- linear probe first, then unfreeze everything with layer-wise lr decay;
* gradual unfr.   -- the head first, then the upper, then the lower blocks join;
* one-cycle GU    -- the same stages under fastai's one-cycle lr schedule, with layer-wise
                     lr decay continued to each new stage (``GradualUnfreezing(...,
                     scheduler=tk.schedules.one_cycle(...), layer_decay=0.5)``);
* L2-SP           -- fine-tune with a pull towards the pretrained weights.

Prints target-test accuracy, mean +- std over 3 seeds (``--smoke``: 1 seed, fewer steps).
The script asserts that every recipe that fine-tunes the pretrained network beats training
from scratch at 5 and at 10 labels per class, on average by more than 2 points. The full run needs
about 65 s of CPU time (one torch thread).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import transferkit as tk
from transferkit.losses import L2SP

STAGES = ["neck", ["features.4", "features.5"], ["features.0", "features.1"]]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    seed: int,
    penalty: Callable[[], torch.Tensor] | None = None,
    on_epoch: Callable[[], object] | None = None,
    on_step: Callable[[], object] | None = None,
) -> None:
    """Mini-batch training for a fixed number of steps.

    ``on_step`` runs after each optimizer step, ``on_epoch`` after each pass.
    """
    loader = tk.datasets.make_loader(x, y, batch_size=32, seed=seed)
    done = 0
    while done < steps:
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step()
            done += 1
            if done == steps:
                return
        if on_epoch is not None:
            on_epoch()


def pretrain(task: tk.datasets.DomainTask, *, seed: int, epochs: int) -> nn.Module:
    tk.seed_everything(seed)
    model = tk.models.SmallCNN(num_classes=task.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * -(-len(task.source_x) // 32)
    fit(model, optimizer, task.source_x, task.source_y, steps=steps, seed=seed)
    return model


def transferred(pretrained: nn.Module) -> nn.Module:
    """A copy of the pretrained network, classifier included (same classes)."""
    return copy.deepcopy(pretrained)


def run(
    method: str,
    pretrained: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    steps: int,
    seed: int,
) -> nn.Module:
    """Train one recipe on the labelled target samples ``(x, y)``; return the model."""
    if method == "scratch":
        tk.seed_everything(seed)
        model: nn.Module = tk.models.SmallCNN(num_classes=num_classes)
        fit(model, torch.optim.Adam(model.parameters(), lr=2e-3), x, y, steps=steps, seed=seed)
        return model
    model = transferred(pretrained)
    if method == "linear probe":
        tk.freeze(model, exclude="fc")  # bn="eval": frozen statistics stay put
        optimizer = torch.optim.Adam(tk.param_groups(model, 1e-2))
        fit(model, optimizer, x, y, steps=steps, seed=seed)
    elif method == "fine-tune":
        optimizer = torch.optim.Adam(tk.param_groups(model, 1e-3, weight_decay=1e-4))
        fit(model, optimizer, x, y, steps=steps, seed=seed)
    elif method == "LP-FT":
        tk.freeze(model, exclude="fc")
        probe = torch.optim.Adam(tk.param_groups(model, 1e-2))
        fit(model, probe, x, y, steps=steps // 2, seed=seed)
        tk.unfreeze(model)
        groups = tk.param_groups(model, 1e-3, layer_decay=0.7, weight_decay=1e-4)
        fit(model, torch.optim.Adam(groups), x, y, steps=steps - steps // 2, seed=seed + 1)
    elif method == "gradual unfreezing":
        # the head trains alone first, then one stage joins every `every` epochs
        epochs = steps // -(-len(x) // 32)
        every = max(1, epochs // (len(STAGES) + 1))
        tk.freeze(model, exclude="fc")  # before the optimizer: it starts with the head only
        optimizer = torch.optim.Adam(tk.param_groups(model, 3e-3))
        schedule = tk.GradualUnfreezing(model, STAGES, optimizer, every=every, lr=1e-3)
        fit(model, optimizer, x, y, steps=steps, seed=seed, on_epoch=schedule.step)
    elif method == "one-cycle GU":
        epochs = steps // -(-len(x) // 32)
        every = max(1, epochs // (len(STAGES) + 1))
        tk.freeze(model, exclude="fc")
        optimizer = torch.optim.Adam(tk.param_groups(model, 3e-3))
        scheduler = tk.schedules.one_cycle(optimizer, steps)
        schedule = tk.GradualUnfreezing(
            model, STAGES, optimizer, every=every, layer_decay=0.5, scheduler=scheduler
        )
        fit(
            model,
            optimizer,
            x,
            y,
            steps=steps,
            seed=seed,
            on_epoch=schedule.step,
            on_step=scheduler.step,
        )
    elif method == "L2-SP":
        l2sp = L2SP(model, alpha=0.1, beta=1e-3, exclude=["fc*"])
        optimizer = torch.optim.Adam(tk.param_groups(model, 1e-3))
        fit(model, optimizer, x, y, steps=steps, seed=seed, penalty=l2sp)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model


METHODS = [
    "scratch",
    "linear probe",
    "fine-tune",
    "LP-FT",
    "gradual unfreezing",
    "one-cycle GU",
    "L2-SP",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="1 seed, fewer steps (< 30 s)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small nets)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [0] if args.smoke else list(range(args.seeds))
    steps = 120 if args.smoke else 200
    pretrain_epochs = 15

    start = time.perf_counter()
    shift = tk.datasets.noise(0.3)
    results: dict[tuple[str, int], list[float]] = {}
    source_only: list[float] = []
    for seed in seeds:
        task = tk.datasets.digits(shift, seed=seed)
        pretrained = pretrain(task, seed=seed, epochs=pretrain_epochs)
        source_only.append(accuracy(pretrained, task.target_test_x, task.target_test_y))
        if seed == seeds[0]:
            print(f"task {task.name}: {len(task.source_x)} labelled source images")
            probe = transferred(pretrained)
            tk.freeze(probe, exclude="fc")
            print("linear probe, what trains:\n" + tk.trainable_summary(probe) + "\n")
        for shots in args.shots:
            x, y = task.few_shot(shots, seed=seed)
            for method in METHODS:
                model = run(
                    method, pretrained, x, y, num_classes=task.num_classes, steps=steps, seed=seed
                )
                acc = accuracy(model, task.target_test_x, task.target_test_y)
                results.setdefault((method, shots), []).append(acc)

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {std:.3f}"

    print(f"target accuracy, mean ± std over {len(seeds)} seed(s); source-only {cell(source_only)}")
    header = f"{'method':<20}" + "".join(f"{f'{s} labels/class':>18}" for s in args.shots)
    print(header)
    print("-" * len(header))
    for method in METHODS:
        print(f"{method:<20}" + "".join(f"{cell(results[(method, s)]):>18}" for s in args.shots))
    print(f"\nfinished in {time.perf_counter() - start:.1f} s")

    # every recipe that fine-tunes the pretrained network beats training from scratch,
    # and on average by more than 2 points
    for shots in args.shots:
        scratch = statistics.mean(results[("scratch", shots)])
        gains = []
        for method in ("fine-tune", "LP-FT", "gradual unfreezing", "one-cycle GU", "L2-SP"):
            transfer = statistics.mean(results[(method, shots)])
            assert transfer > scratch, (
                f"{method} ({transfer:.3f}) should beat scratch ({scratch:.3f}) at {shots}/class"
            )
            gains.append(transfer - scratch)
        assert statistics.mean(gains) > 0.02, f"mean gain {statistics.mean(gains):.3f} at {shots}"
        print(f"{shots} labels/class: transfer beats scratch by {statistics.mean(gains):+.3f}")


if __name__ == "__main__":
    main()

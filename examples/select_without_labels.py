"""Choosing DANN's trade-off weight when the target has no labels.

Domain-adversarial training (DANN) has a weight lambda on the adversarial loss: too
small and nothing adapts, too large and the features lose the class information. The
usual way to pick it, target accuracy, needs target labels we do not have. This script
trains one DANN per lambda on a digits shift and lets each unsupervised validator choose:

* source validation accuracy (the naive choice: ignores the shift),
* IWCV: importance-weighted source validation loss (``tk.selection.iwcv``),
* DEV: deep embedded validation (``tk.selection.dev``),
* SND: soft neighbourhood density of target predictions (``tk.selection.snd``),
* prediction entropy on the target (``tk.selection.prediction_entropy``),

and compares the true target test accuracy of each choice with the oracle (the best
lambda, chosen with target labels). IWCV and DEV use each model's own bottleneck
features for the density ratio, as in the DEV paper.

Run ``python examples/select_without_labels.py`` (6 weights x 3 seeds, about 2 minutes
on 2 CPU cores) or with ``--smoke`` (3 weights, one seed, < 60 s; asserts that the
weight chosen by IWCV or DEV beats the worst one and lands within 0.05 of the oracle).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import transferkit as tk
from transferkit import datasets as D


@dataclass
class Candidate:
    trade_off: float
    target_acc: float
    source_acc: float
    iwcv: float
    dev: float
    snd: float
    entropy: float


def train_dann(task: D.DomainTask, trade_off: float, *, steps: int, seed: int) -> nn.Module:
    """DANN with Ganin et al.'s recipe: SGD + momentum, annealed learning rate, ramped weight."""
    tk.seed_everything(seed)
    model = tk.models.SmallCNN(num_classes=task.num_classes, width=16, feature_dim=64)
    params = list(model.parameters())
    criterion = None
    if trade_off > 0:
        schedule = tk.WarmStartSchedule(max_steps=steps, alpha=10.0, hi=trade_off)
        criterion = tk.DomainAdversarialLoss(
            tk.DomainDiscriminator(model.feature_dim, hidden=256),
            grl=tk.GradientReversal(schedule),
        )
        params += list(criterion.parameters())
    optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=5e-4, nesterov=True)
    annealing = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1.0 + 10.0 * step / steps) ** -0.75
    )
    source = tk.datasets.infinite(
        tk.datasets.make_loader(
            task.source_x, task.source_y, batch_size=32, drop_last=True, seed=seed
        )
    )
    target = tk.datasets.infinite(
        tk.datasets.make_loader(task.target_x, batch_size=32, drop_last=True, seed=seed + 1)
    )
    for _ in range(steps):
        model.train()
        (xs, ys), (xt,) = next(source), next(target)
        features = model.forward_features(torch.cat([xs, xt]))
        loss = nn.functional.cross_entropy(model.fc(features[: len(xs)]), ys)
        if criterion is not None:
            loss = loss + criterion(features[: len(xs)], features[len(xs) :])
            criterion.grl.schedule.step()  # type: ignore[union-attr]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        annealing.step()
    return model.eval()


def validate(model: nn.Module, task: D.DomainTask, trade_off: float) -> Candidate:
    with torch.inference_mode():
        source_features = model.forward_features(task.source_test_x)
        source_logits = model.fc(source_features)
        target_features = model.forward_features(task.target_x)
        target_logits = model.fc(target_features)
        test_predictions = model(task.target_test_x).argmax(1)
    losses = nn.functional.cross_entropy(source_logits, task.source_test_y, reduction="none")
    weights = tk.selection.importance_weights(source_features, target_features)
    return Candidate(
        trade_off=trade_off,
        target_acc=float((test_predictions == task.target_test_y).float().mean()),
        source_acc=float((source_logits.argmax(1) == task.source_test_y).float().mean()),
        iwcv=tk.selection.iwcv(losses, weights=weights),
        dev=tk.selection.dev(losses, weights=weights),
        snd=tk.selection.snd(target_logits),
        entropy=tk.selection.prediction_entropy(target_logits),
    )


VALIDATORS: dict[str, Callable[[Candidate], float]] = {
    # each maps a candidate to "higher is better"
    "source validation acc": lambda c: c.source_acc,
    "IWCV": lambda c: -c.iwcv,
    "DEV": lambda c: -c.dev,
    "SND": lambda c: c.snd,
    "prediction entropy": lambda c: -c.entropy,
    "oracle (target labels)": lambda c: c.target_acc,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="quick run that asserts")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    start = time.perf_counter()
    trade_offs = [0.0, 0.1, 1.0] if args.smoke else [0.0, 0.03, 0.1, 0.3, 1.0, 3.0]
    seeds = [0] if args.smoke else list(range(args.seeds))
    chosen: dict[str, list[tuple[float, float, float]]] = {name: [] for name in VALIDATORS}
    for seed in seeds:
        task = tk.datasets.digits(D.rotate(35), size=12, seed=seed)
        print(f"\n{task.name}, seed {seed}: one DANN per trade-off weight, {args.steps} steps")
        candidates = [
            validate(train_dann(task, weight, steps=args.steps, seed=seed), task, weight)
            for weight in trade_offs
        ]
        print(
            f"{'lambda':>7}{'target acc':>12}{'source acc':>12}{'IWCV risk':>11}"
            f"{'DEV risk':>10}{'SND':>8}{'entropy':>9}"
        )
        for c in candidates:
            print(
                f"{c.trade_off:>7g}{c.target_acc:>12.3f}{c.source_acc:>12.3f}{c.iwcv:>11.3f}"
                f"{c.dev:>10.3f}{c.snd:>8.3f}{c.entropy:>9.3f}"
            )
        oracle = max(c.target_acc for c in candidates)
        for name, key in VALIDATORS.items():
            choice = max(candidates, key=key)
            chosen[name].append((choice.trade_off, choice.target_acc, oracle))

    print(f"\nChosen trade-off weight per validator ({len(seeds)} seed(s), rotate(35) digits)")
    print(f"{'validator':<24}{'chosen lambda':>16}{'target acc':>12}{'gap to oracle':>15}")
    print("-" * 67)
    for name, picks in chosen.items():
        weights = ",".join(f"{w:g}" for w, _, _ in picks)
        accuracy = sum(a for _, a, _ in picks) / len(picks)
        gap = sum(o - a for _, a, o in picks) / len(picks)
        print(f"{name:<24}{weights:>16}{accuracy:>12.3f}{gap:>15.3f}")
    print(f"\nfinished in {time.perf_counter() - start:.1f} s")

    if args.smoke:
        oracle = max(c.target_acc for c in candidates)
        worst = min(c.target_acc for c in candidates)
        assert oracle - worst > 0.05, "the trade-off weight made no difference; nothing to pick"
        weighted = max(chosen["IWCV"][0][1], chosen["DEV"][0][1])
        assert weighted > worst, f"IWCV and DEV picked the worst weight: {chosen}"
        assert oracle - weighted <= 0.05, f"IWCV and DEV are > 0.05 from the oracle: {chosen}"


if __name__ == "__main__":
    main()

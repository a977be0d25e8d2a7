"""Which pretrained network should I fine-tune? Rank candidates before training them.

Several small CNNs are pretrained on differently shifted sources (clean digits, rotated,
inverted, noisy, blurred ones, plus an untrained network). The target is digits rotated
by 45 degrees with only a few labelled images per class. For every candidate we compute,
from ONE forward pass over the labelled target images and no training:

* LogME on its bottleneck features (``tk.selection.logme``),
* LEEP on its source-class probabilities (``tk.selection.leep``),

and then we measure what the scores try to predict: the target test accuracy after
actually fine-tuning every candidate on those labelled images (and, for reference, a
linear probe on its frozen features). The printed table puts scores next to accuracies
and reports the Kendall rank correlation between them (1 = identical ranking).

Run ``python examples/choose_model.py`` (about 2 minutes on 2 CPU cores) or with
``--smoke`` (fewer candidates and epochs, < 60 s; asserts that both scores rank
positively with the fine-tuned accuracy and that LogME's top choice beats the median).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import kendalltau
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

import transferkit as tk
from transferkit import datasets as D

SOURCES: dict[str, D.Shift | list[D.Shift] | None] = {
    "clean": None,
    "rotate(15)": D.rotate(15),
    "rotate(30)": D.rotate(30),
    "rotate(45)": D.rotate(45),
    "rotate(-45)": D.rotate(-45),
    "invert": D.invert(),
    "noise(0.5)": D.noise(0.5),
    "blur(1.5)": D.blur(1.5),
}
SMOKE_SOURCES = ["clean", "rotate(45)", "invert", "noise(0.5)"]


@dataclass
class Row:
    name: str
    logme: float
    leep: float
    probe_acc: float
    finetuned_acc: float


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int
) -> None:
    tk.seed_everything(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = tk.datasets.make_loader(x, y, batch_size=64, seed=seed)
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()


def pretrained(name: str, *, epochs: int, seed: int, width: int) -> nn.Module:
    tk.seed_everything(seed)
    model = tk.models.SmallCNN(num_classes=10, width=width, feature_dim=64)
    if name != "untrained":
        source = tk.datasets.digits(None, source_shift=SOURCES[name], seed=seed)
        train(model, source.source_x, source.source_y, epochs=epochs, lr=2e-3, seed=seed)
    return model


def evaluate_candidate(
    name: str,
    model: nn.Module,
    task: D.DomainTask,
    shots: tuple[torch.Tensor, torch.Tensor],
    *,
    finetune_epochs: int,
    seed: int,
) -> Row:
    x, y = shots
    features = tk.extract_features(model, x, layers="neck", progress=False)
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1).numpy()
    test_features = tk.extract_features(model, task.target_test_x, layers="neck", progress=False)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(features, y.numpy())
    probe_acc = float(probe.score(test_features, task.target_test_y.numpy()))
    # Fine-tune the whole network with a new head, as a user would after choosing it.
    model.fc = nn.Linear(model.fc.in_features, task.num_classes)
    train(model, x, y, epochs=finetune_epochs, lr=1e-3, seed=seed)
    return Row(
        name=name,
        logme=tk.selection.logme(features, y),
        leep=tk.selection.leep(probs, y),
        probe_acc=probe_acc,
        finetuned_acc=accuracy(model, task.target_test_x, task.target_test_y),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="quick run that asserts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=10, help="labelled target images/class")
    args = parser.parse_args()

    start = time.perf_counter()
    names = [*SMOKE_SOURCES, "untrained"] if args.smoke else [*SOURCES, "untrained"]
    pretrain_epochs, finetune_epochs = (8, 15) if args.smoke else (15, 30)
    width = 16 if args.smoke else 32
    task = tk.datasets.digits(D.rotate(45), seed=args.seed)
    shots = task.few_shot(args.shots, seed=args.seed)
    print(f"target {task.name}: {len(shots[1])} labelled images, {len(task.target_test_y)} test")

    rows = []
    for name in names:
        model = pretrained(name, epochs=pretrain_epochs, seed=args.seed, width=width)
        rows.append(
            evaluate_candidate(
                name, model, task, shots, finetune_epochs=finetune_epochs, seed=args.seed
            )
        )
    rows.sort(key=lambda r: -r.logme)

    header = f"{'source of pretraining':<22}{'LogME':>8}{'LEEP':>8}{'probe acc':>11}"
    print(f"\n{header}{'fine-tuned acc':>16}")
    print("-" * 65)
    for r in rows:
        print(
            f"{r.name:<22}{r.logme:>8.3f}{r.leep:>8.3f}{r.probe_acc:>11.3f}{r.finetuned_acc:>16.3f}"
        )
    finetuned = np.array([r.finetuned_acc for r in rows])
    taus = {}
    for score in ("logme", "leep"):
        values = np.array([getattr(r, score) for r in rows])
        taus[score] = (
            float(kendalltau(values, finetuned).statistic),
            float(kendalltau(values, [r.probe_acc for r in rows]).statistic),
        )
    print("\nKendall tau between score and real target accuracy:")
    for score, (tau_ft, tau_probe) in taus.items():
        print(f"  {score:<6} vs fine-tuned {tau_ft:+.3f}   vs linear probe {tau_probe:+.3f}")
    best = rows[0]
    print(
        f"\nLogME picks '{best.name}': fine-tuned accuracy {best.finetuned_acc:.3f} "
        f"(best possible {finetuned.max():.3f}, median {np.median(finetuned):.3f})"
    )
    print(f"finished in {time.perf_counter() - start:.1f} s")

    if args.smoke:
        assert taus["logme"][0] > 0, f"LogME does not rank with fine-tuned accuracy: {taus}"
        assert taus["leep"][0] > 0, f"LEEP does not rank with fine-tuned accuracy: {taus}"
        assert best.finetuned_acc >= np.median(finetuned), "LogME's choice is below the median"


if __name__ == "__main__":
    main()

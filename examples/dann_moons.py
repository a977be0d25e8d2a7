"""DANN on the rotated two-moons toy of Ganin et al. (JMLR 2016, figure 2).

The source domain is labelled two moons; the target domain is an independent draw
rotated by 35 degrees, unlabelled during training. Two networks with the same
architecture (a small ReLU MLP) are trained with the same optimizer and budget:

* source-only: cross-entropy on source labels;
* DANN: the same, plus ``tk.DomainAdversarialLoss`` on the hidden features, with the
  reversal coefficient ramped by ``tk.WarmStartSchedule``.

The script prints target-test accuracy (mean ± std over 5 seeds) and saves a plot of
both decision boundaries (``--out``, default ``dann_moons.png``).

    python examples/dann_moons.py            # full run, ~20 s on 2 cores
    python examples/dann_moons.py --smoke    # fewer steps/seeds; asserts DANN wins
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import transferkit as tk

HIDDEN = (32, 32)


def make_network() -> tk.models.MLP:
    return tk.models.MLP(2, 2, hidden=HIDDEN)


def train(
    task: tk.datasets.DomainTask, *, adapt: bool, steps: int, seed: int, trade_off: float = 0.5
) -> tk.models.MLP:
    """Full-batch training; DANN adds the domain-adversarial loss on hidden features."""
    tk.seed_everything(seed)
    model = make_network()
    params = list(model.parameters())
    criterion = None
    if adapt:
        schedule = tk.WarmStartSchedule(max_steps=steps, alpha=10.0, hi=trade_off)
        criterion = tk.DomainAdversarialLoss(
            tk.DomainDiscriminator(model.feature_dim, hidden=32, depth=2, dropout=0.0),
            grl=tk.GradientReversal(schedule),
        )
        params += list(criterion.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        model.train()
        optimizer.zero_grad()
        features = model.forward_features(torch.cat([task.source_x, task.target_x]))
        source_features = features[: len(task.source_x)]
        loss = nn.functional.cross_entropy(model.fc(source_features), task.source_y)
        if criterion is not None:
            loss = loss + criterion(source_features, features[len(task.source_x) :])
            criterion.grl.schedule.step()  # type: ignore[union-attr]
        loss.backward()
        optimizer.step()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def plot(task: tk.datasets.DomainTask, models: dict[str, nn.Module], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = torch.cat([task.source_x, task.target_x]).numpy()
    low, high = points.min(0) - 0.5, points.max(0) + 0.5
    xx, yy = np.meshgrid(np.linspace(low[0], high[0], 300), np.linspace(low[1], high[1], 300))
    grid = torch.from_numpy(np.c_[xx.ravel(), yy.ravel()].astype(np.float32))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.5))
    for ax, (name, model) in zip(np.atleast_1d(axes), models.items(), strict=True):
        model.eval()
        with torch.inference_mode():
            prob = model(grid).softmax(1)[:, 1].reshape(xx.shape).numpy()
        ax.contourf(xx, yy, prob, levels=[0.0, 0.5, 1.0], colors=["#f4c7c3", "#c6dbef"])
        ax.contour(xx, yy, prob, levels=[0.5], colors="k", linewidths=1.5)
        s, t = task.source_x.numpy(), task.target_test_x.numpy()
        ax.scatter(*s.T, c=task.source_y.numpy(), cmap="bwr_r", s=12, label="source")
        ax.scatter(*t.T, c="k", marker="x", s=12, alpha=0.6, label="target (test)")
        acc = accuracy(model, task.target_test_x, task.target_test_y)
        ax.set_title(f"{name}: target accuracy {acc:.3f}")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".png", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        fig.savefig(temporary, dpi=110)
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="at least 2")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--angle", type=float, default=35.0)
    parser.add_argument("--out", type=Path, default=Path("dann_moons.png"))
    parser.add_argument("--smoke", action="store_true", help="quick run that asserts the result")
    args = parser.parse_args()
    if args.smoke:
        args.seeds = 3
    torch.set_num_threads(1)  # tiny full-batch MLPs: threads only add overhead

    start = time.perf_counter()
    results: dict[str, list[float]] = {"source-only": [], "DANN": []}
    last: dict[str, nn.Module] = {}
    task = tk.datasets.moons(args.angle, seed=0)
    for seed in range(args.seeds):
        task = tk.datasets.moons(args.angle, seed=seed)
        for name, adapt in (("source-only", False), ("DANN", True)):
            model = train(task, adapt=adapt, steps=args.steps, seed=seed)
            results[name].append(accuracy(model, task.target_test_x, task.target_test_y))
            last[name] = model

    print(f"{task.name}: target-test accuracy over {args.seeds} seeds, MLP {HIDDEN}")
    print(f"{'method':<12}  {'mean':>6}  {'std':>6}  per seed")
    for name, values in results.items():
        mean, std = statistics.mean(values), statistics.stdev(values)
        per_seed = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:<12}  {mean:6.3f}  {std:6.3f}  {per_seed}")
    plot(task, last, args.out)
    print(f"decision boundaries of seed {args.seeds - 1} saved to {args.out}")
    print(f"done in {time.perf_counter() - start:.1f} s")

    if args.smoke:
        gain = statistics.mean(results["DANN"]) - statistics.mean(results["source-only"])
        assert gain > 0.05, f"DANN should beat source-only clearly, gain was {gain:.3f}"
        assert args.out.is_file()
        assert args.out.stat().st_size > 0


if __name__ == "__main__":
    main()

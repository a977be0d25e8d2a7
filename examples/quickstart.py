"""transferkit quickstart: one shifted digits task, five ways to transfer.

Run with ``make demo`` (or ``python examples/quickstart.py``); about a minute on a 2-core
CPU. The story:

1. ``tk.datasets.digits(rotate(35))``: labelled source digits, an unlabelled rotated
   target half, and a labelled target test split for evaluation only;
2. pretrain a small CNN on the source domain and evaluate it on the target
   (**source-only**);
3. **deep features + kernel SVM**: extract the pretrained network's features and fit a
   ``TorchKernelSVC`` on a few labelled target samples per class;
4. **frozen backbone + new head**: freeze the pretrained network, put a new
   ``ClassifierHead`` on it and train only the head on the same few target labels;
5. **MMD** and 6. **DANN**: unsupervised adaptation with the unlabelled target, using
   ``tk.losses.mmd`` / ``tk.DomainAdversarialLoss`` in an ordinary training loop.

It prints one table and saves ``quickstart.png``: t-SNE of source and target features
before and after adaptation, and the accuracies as bars. ``--smoke`` runs a shorter
budget and asserts that adaptation and transfer beat source-only.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

import transferkit as tk

BATCH = 32


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def train(
    task: tk.datasets.DomainTask,
    *,
    method: str,
    steps: int,
    seed: int,
    model: nn.Module | None = None,
    labelled: tuple[Tensor, Tensor] | None = None,
) -> nn.Module:
    """One training loop for every method: only the extra loss term differs.

    ``method`` is "source" (cross-entropy on source batches), "mmd" or "dann" (plus an
    adaptation term on unlabelled target batches) or "head" (cross-entropy on the few
    ``labelled`` target samples; only trainable parameters are optimised).
    """
    tk.seed_everything(seed)
    if model is None:
        model = tk.models.SmallCNN(num_classes=task.num_classes, width=16)
    schedule = tk.WarmStartSchedule(steps, hi=1.0)  # ramps the adaptation weight 0 -> 1
    params = tk.param_groups(model, lr=0.01, weight_decay=5e-4)  # only trainable parameters
    if method == "dann":
        discriminator = tk.DomainDiscriminator(model.feature_dim, hidden=256)
        adversary = tk.DomainAdversarialLoss(discriminator, grl=tk.GradientReversal(schedule))
        params += tk.param_groups(adversary, lr=0.01, weight_decay=5e-4)
    optimizer = torch.optim.SGD(params, momentum=0.9, nesterov=True)
    annealing = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1.0 + 10.0 * step / steps) ** -0.75
    )
    x, y = labelled if method == "head" else (task.source_x, task.source_y)
    source = tk.datasets.infinite(tk.datasets.make_loader(x, y, batch_size=BATCH, seed=seed))
    target = tk.datasets.infinite(
        tk.datasets.make_loader(task.target_x, batch_size=BATCH, drop_last=True, seed=seed + 1)
    )
    model.train()
    for _ in range(steps):
        x_s, y_s = next(source)
        if method in ("source", "head"):
            loss = nn.functional.cross_entropy(model(x_s), y_s)
        else:
            (x_t,) = next(target)
            features = model.forward_features(torch.cat([x_s, x_t]))
            f_s, f_t = features[: len(x_s)], features[len(x_s) :]
            loss = nn.functional.cross_entropy(model.fc(f_s), y_s)
            if method == "mmd":
                loss = loss + schedule.value * tk.losses.mmd(f_s, f_t, tk.kernels.GaussianKernel())
            else:
                loss = loss + adversary(f_s, f_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        annealing.step()
        schedule.step()
    return model.eval()


def features_of(model: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return model.forward_features(x)  # type: ignore[operator, no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=5, help="labelled target samples/class")
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--out", type=Path, default=Path("quickstart.png"))
    parser.add_argument("--smoke", action="store_true", help="short budget, assert result")
    args = parser.parse_args()
    steps = 300 if args.smoke else args.steps
    start = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    task = tk.datasets.digits(tk.datasets.rotate(35), seed=args.seed)
    shots_x, shots_y = task.few_shot(args.shots, seed=args.seed)
    print(
        f"task {task.name}: {len(task.source_x)} labelled source images, "
        f"{len(task.target_x)} unlabelled target images, {len(shots_x)} target labels"
    )

    # 1. pretrain on the source domain; evaluate on the shifted target as it is
    pretrained = train(task, method="source", steps=steps, seed=args.seed)
    results = {"source-only": accuracy(pretrained, task.target_test_x, task.target_test_y)}
    in_domain = accuracy(pretrained, task.source_test_x, task.source_test_y)

    # 2. deep features of the pretrained network + a kernel SVM on the few target labels
    with tk.FeatureExtractor(pretrained, layers="neck") as extractor:
        train_features = tk.extract_features(extractor, shots_x, progress=False)
        test_features = tk.extract_features(extractor, task.target_test_x, progress=False)
    svm = tk.sklearn.TorchKernelSVC(kernel="rbf", C=10.0).fit(train_features, shots_y.numpy())
    results["deep features + SVM"] = float(svm.score(test_features, task.target_test_y.numpy()))

    # 3. frozen backbone + a new head trained on the few target labels
    finetuned = copy.deepcopy(pretrained)
    tk.freeze(finetuned)  # every parameter; BatchNorm statistics stay fixed too
    finetuned.fc = tk.ClassifierHead(finetuned.feature_dim, task.num_classes, hidden=(64,))
    train(
        task,
        method="head",
        steps=steps // 3,
        seed=args.seed,
        model=finetuned,
        labelled=(shots_x, shots_y),
    )
    results["frozen backbone + new head"] = accuracy(
        finetuned, task.target_test_x, task.target_test_y
    )

    # 4./5. unsupervised adaptation with the unlabelled target
    adapted = {}
    for method in ("mmd", "dann"):
        adapted[method] = train(task, method=method, steps=steps, seed=args.seed)
        results[method.upper() + " (unlabelled target)"] = accuracy(
            adapted[method], task.target_test_x, task.target_test_y
        )

    width = max(len(name) for name in results)
    print(f"\nsource-domain test accuracy of the pretrained network: {in_domain:.3f}\n")
    print(f"{'method':<{width}}  target-test accuracy")
    print("-" * (width + 22))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:.3f}")

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (title, model) in zip(
        axes[:2], [("before: source-only", pretrained), ("after: MMD", adapted["mmd"])], strict=True
    ):
        tk.plot.embedding(
            features_of(model, task.source_test_x),
            features_of(model, task.target_test_x),
            labels=(task.source_test_y, task.target_test_y),
            method="tsne",
            ax=ax,
            title=f"{title} (o source, x target)",
            seed=args.seed,
        )
        ax.get_legend().remove()  # colours are the ten classes; o = source, x = target
    axes[2].barh(list(results), list(results.values()), color="tab:blue")
    axes[2].axvline(results["source-only"], color="tab:red", linestyle="--")
    axes[2].set_xlim(0, 1)
    axes[2].set_xlabel("target-test accuracy")
    axes[2].invert_yaxis()
    figure.tight_layout()
    saved = tk.plot.save(figure, args.out)
    print(f"\nsaved {saved}; finished in {time.perf_counter() - start:.1f} s")

    if args.smoke:
        baseline = results["source-only"]
        assert all(v > baseline for k, v in results.items() if k != "source-only"), results


if __name__ == "__main__":
    main()

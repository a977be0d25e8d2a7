"""The classic recipe: an ImageNet-pretrained ResNet-50 fine-tuned on your image folder.

The network's convolutional backbone is frozen (its BatchNorm statistics too); on top of
its global average pool (GAP) sits a new head, Dense(512) + ReLU + Dropout(0.5) +
Dense(num_classes). Training uses data augmentation (RandomResizedCrop, horizontal
flip), class-weighted cross-entropy (for imbalanced folders) and early stopping on the
validation loss, which restores the best weights at the end.

Your data is an image folder, one sub-folder per class (torchvision ``ImageFolder``)::

    data/cats/001.jpg  data/dogs/002.png  ...                 (split 80/20 here), or
    data/train/cats/...  data/val/cats/...                    (your own split)

Run (needs internet once, to download the weights)::

    python examples/finetune_imagefolder.py --data data/ --epochs 20
    python examples/finetune_imagefolder.py --data data/ --backend timm --save best.pt

``--smoke`` runs the very same code offline in well under a minute on a CPU: random-init
weights (``weights=None`` / ``pretrained=False``) instead of ImageNet ones, a tiny image
folder generated into a temporary directory (colour-coded classes) and 32-pixel crops;
it asserts that the backbone stayed frozen and that the head learned the classes.

Needs the ``vision`` extra (torchvision, and timm for ``--backend timm``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import transferkit as tk
from transferkit.training import EarlyStopping, class_weights

try:
    import torchvision
    from torchvision import datasets, transforms
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SystemExit("this example needs torchvision: pip install 'transferkit[vision]'") from error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- data


def make_transforms(image_size: int) -> tuple[transforms.Compose, transforms.Compose]:
    """Augmentation for training, resize + centre crop for validation."""
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.5, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    val = transforms.Compose(
        [
            transforms.Resize(round(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, val


def load_folders(
    root: Path, image_size: int, *, val_fraction: float, seed: int
) -> tuple[Subset[tuple[torch.Tensor, int]], Subset[tuple[torch.Tensor, int]], list[str]]:
    """ImageFolder train/val sets: ``root/train`` + ``root/val``, or a seeded split of root."""
    train_tf, val_tf = make_transforms(image_size)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = datasets.ImageFolder(root / "train", transform=train_tf)
        val = datasets.ImageFolder(root / "val", transform=val_tf)
        if val.classes != train.classes:
            raise SystemExit(f"train and val folders hold different classes under {root}")
        return Subset(train, range(len(train))), Subset(val, range(len(val))), train.classes
    train_view = datasets.ImageFolder(root, transform=train_tf)
    val_view = datasets.ImageFolder(root, transform=val_tf)
    targets = np.asarray(train_view.targets)
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for cls in range(len(train_view.classes)):  # stratified: every class in both splits
        members = rng.permutation(np.flatnonzero(targets == cls))
        cut = max(1, round(len(members) * val_fraction))
        val_idx += members[:cut].tolist()
        train_idx += members[cut:].tolist()
    return Subset(train_view, train_idx), Subset(val_view, val_idx), train_view.classes


def subset_targets(subset: Subset[tuple[torch.Tensor, int]]) -> torch.Tensor:
    folder = subset.dataset
    if not isinstance(folder, datasets.ImageFolder):
        raise TypeError("expected a Subset of an ImageFolder")
    return torch.as_tensor([folder.targets[i] for i in subset.indices], dtype=torch.int64)


def write_tiny_image_folder(root: Path, *, classes: int = 3, per_class: int = 20) -> Path:
    """A generated folder of PNGs: each class has its own colour, with random noise/boxes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    palette = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210], [210, 190, 40]])
    for cls in range(classes):
        folder = root / f"class_{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # the class colour tints the whole picture; a random grey box and noise vary it
            image = palette[cls % len(palette)] + rng.normal(0, 25, size=(72, 72, 3))
            top, left = rng.integers(0, 40, size=2)
            image[top : top + 30, left : left + 30] = rng.integers(60, 200)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


# --------------------------------------------------------------------------- model


def build_model(backend: str, arch: str, num_classes: int, *, pretrained: bool) -> nn.Module:
    """A ResNet with ImageNet weights (or random init), frozen, with a new GAP-512 head."""
    if backend == "torchvision":
        weights = "IMAGENET1K_V2" if pretrained else None
        model: nn.Module = torchvision.models.get_model(arch, weights=weights)
    else:
        import timm

        model = timm.create_model(arch, pretrained=pretrained)
    # The network's own global average pool feeds the head with (N, C) features.
    _, old_head = tk.find_head(model)
    in_features = int(old_head.in_features)  # type: ignore[arg-type]
    head = tk.ClassifierHead(in_features, num_classes, hidden=(512,), dropout=0.5, pool="avg")
    tk.replace_head(model, head)
    head_name, _ = tk.find_head(model)
    # Freeze everything but the new head; frozen BatchNorm layers stay in eval mode.
    tk.freeze(model, exclude=f"{head_name}*", bn="eval")
    return model


# --------------------------------------------------------------------------- training


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


def run_epoch(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[float, float]:
    """One pass over ``loader``: trains when an optimizer is given; returns loss, accuracy."""
    training = optimizer is not None
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for images, labels in loader:
            images, labels = tk.to_device((images, labels), device)
            with tk.autocast(device, enabled=device.type == "cuda"):
                logits = model(images)
            loss = criterion(logits.float(), labels)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total_loss += float(loss.detach()) * labels.shape[0]
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.shape[0]
    return total_loss / seen, correct / seen


def save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(descriptor)
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def finetune(args: argparse.Namespace, data: Path) -> tuple[list[EpochResult], nn.Module, dict]:
    tk.seed_everything(args.seed)
    device = tk.resolve_device(args.device)
    train_set, val_set, classes = load_folders(
        data, args.image_size, val_fraction=args.val_fraction, seed=args.seed
    )
    loader_kwargs = tk.dataloader_kwargs(device)
    if args.workers is not None:
        loader_kwargs.update(num_workers=args.workers, persistent_workers=args.workers > 0)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, generator=generator, **loader_kwargs
    )
    val_loader = DataLoader(val_set, batch_size=args.batch_size, **loader_kwargs)

    model = build_model(args.backend, args.arch, len(classes), pretrained=not args.smoke)
    model.to(device)
    print(tk.trainable_summary(model).splitlines()[-1])
    targets = subset_targets(train_set)
    criterion = nn.CrossEntropyLoss(weight=class_weights(targets, len(classes)).to(device))
    optimizer = torch.optim.AdamW(tk.param_groups(model, args.lr, weight_decay=args.weight_decay))
    stopper = EarlyStopping(patience=args.patience, mode="min")

    history: list[EpochResult] = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        train_loss, train_acc = run_epoch(model, train_loader, criterion, device, optimizer)
        val_loss, val_acc = run_epoch(model, val_loader, criterion, device)
        history.append(
            EpochResult(
                epoch, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - start
            )
        )
        r = history[-1]
        print(
            f"{r.epoch:>5} {r.train_loss:>10.4f} {r.train_accuracy:>9.3f} "
            f"{r.val_loss:>9.4f} {r.val_accuracy:>7.3f} {r.seconds:>6.1f}s"
        )
        if stopper.step(val_loss, model):
            print(f"early stopping: no improvement for {args.patience} epochs")
            break
    if not stopper.stopped:
        stopper.restore(model)  # end on the best epoch, as when stopping early
    info = {"classes": classes, "best_epoch": stopper.best_step + 1, "stopper": stopper}
    if args.save is not None:
        save_atomic(model.state_dict(), Path(args.save))
        print(f"saved the best weights to {args.save}")
    return history, model, info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="image folder (class sub-folders)")
    parser.add_argument("--backend", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write the best weights here")
    parser.add_argument("--smoke", action="store_true", help="offline CI run (< 60 s on CPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        # random-init features are poorly scaled: a smaller step than with ImageNet weights
        args.image_size = min(args.image_size, 32)
        args.epochs = min(args.epochs, 10)
        args.batch_size = 16
        args.lr = 3e-4
        args.patience = 3
        args.device = "cpu" if args.device == "auto" else args.device
    elif args.data is None:
        parser.error("--data is required (or use --smoke)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_image_folder(Path(tmp) / "images") if args.smoke else args.data
        weights = "random init (smoke)" if args.smoke else "ImageNet"
        print(f"{args.backend} {args.arch}, {weights} weights, data: {data}")
        print(f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>7}")
        history, model, info = finetune(args, Path(data))
    best = history[info["best_epoch"] - 1]
    print(
        f"\nbest epoch {best.epoch}/{len(history)}: val_loss {best.val_loss:.4f}, "
        f"val_acc {best.val_accuracy:.3f} ({len(info['classes'])} classes, "
        f"{time.perf_counter() - begin:.1f}s)"
    )
    if args.smoke:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        head_name, _ = tk.find_head(model)
        assert trainable, "nothing is trainable"
        assert all(n.startswith(head_name) for n in trainable), f"backbone not frozen: {trainable}"
        assert history[-1].train_loss < history[0].train_loss, "training loss did not fall"
        chance = 1.0 / len(info["classes"])
        assert best.val_accuracy >= chance + 0.3, f"val accuracy {best.val_accuracy:.3f}"
        print("smoke test passed")


if __name__ == "__main__":
    main()

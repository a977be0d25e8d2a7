"""Small models and training loops shared by the freezing tests."""

from __future__ import annotations

import torch
from torch import nn

import transferkit as tk
from transferkit.freezing import FrozenBatchNorm


def make_net(seed: int = 0, num_classes: int = 10) -> tk.models.SmallCNN:
    torch.manual_seed(seed)
    return tk.models.SmallCNN(num_classes=num_classes, width=8, feature_dim=32)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 10,
    batch: int = 32,
) -> None:
    model.train()
    for step in range(steps):
        start = (step * batch) % (len(x) - batch)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(
            model(x[start : start + batch]), y[start : start + batch]
        )
        loss.backward()
        optimizer.step()


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm))]

"""DomainDiscriminator: the MLP with one domain logit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transferkit as tk


def test_discriminator_is_linear_bn_relu_dropout_blocks_with_one_logit() -> None:
    disc = tk.DomainDiscriminator(12, hidden=16, depth=3, dropout=0.5)
    kinds = [type(m).__name__ for m in disc.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 3 + ["Linear"]
    assert disc.layers[-1].out_features == 1
    assert not any(isinstance(m, (nn.Sigmoid, nn.Softmax)) for m in disc.modules())
    assert disc(torch.randn(5, 12)).shape == (5,)


def test_discriminator_gives_nonzero_gradient_to_its_input() -> None:
    criterion = tk.DomainAdversarialLoss(tk.DomainDiscriminator(6, hidden=8))
    source = torch.randn(10, 6, requires_grad=True)
    criterion(source, torch.randn(10, 6) + 1.0).backward()
    assert source.grad.abs().sum() > 0


def test_discriminator_learns_to_separate_clearly_different_real_domains() -> None:
    tk.seed_everything(0)
    task = tk.datasets.digits("invert", size=8, seed=0).flat()
    criterion = tk.DomainAdversarialLoss(
        tk.DomainDiscriminator(64, hidden=64), grl=tk.GradientReversal(0.0)
    )
    optimizer = torch.optim.Adam(criterion.parameters(), lr=1e-3)
    source = tk.datasets.infinite(tk.datasets.make_loader(task.source_x, batch_size=32))
    target = tk.datasets.infinite(tk.datasets.make_loader(task.target_x, batch_size=48, seed=1))
    for _ in range(60):
        optimizer.zero_grad()
        criterion(next(source)[0], next(target)[0]).backward()
        optimizer.step()
    assert criterion.domain_accuracy > 0.95
    criterion.eval()
    with torch.no_grad():
        held_out = criterion.discriminator(torch.cat([task.source_test_x, task.target_test_x]))
    truth = torch.cat([torch.ones(len(task.source_test_x)), torch.zeros(len(task.target_test_x))])
    accuracy = float(((held_out > 0).float() == truth).float().mean())
    assert accuracy > 0.95


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"in_features": 0}, ValueError),
        ({"in_features": 4, "depth": -1}, ValueError),
        ({"in_features": 4, "dropout": 1.0}, ValueError),
        ({"in_features": 4, "hidden": 3.5}, TypeError),
    ],
)
def test_discriminator_rejects_bad_arguments(kwargs, error) -> None:
    with pytest.raises(error):
        tk.DomainDiscriminator(**kwargs)

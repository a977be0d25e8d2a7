"""End to end on the offline digits task: AdaBN and DSBN + self-training beat source only.

scikit-learn digits, target = the other half with pixel noise (sigma 0.3), a small CNN
trained from scratch with fixed seeds (deterministic on the CPU). Source only normalises
noisy target images with clean-source BatchNorm statistics; re-estimating them on the
unlabelled target (``tk.adapt_batchnorm``) and training with per-domain BatchNorm plus
FixMatch-style self-training must both do clearly better.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import transferkit as tk
from transferkit.datasets import DomainTask, infinite, make_loader

STEPS = 150


def _task() -> DomainTask:
    return tk.datasets.digits(tk.datasets.noise(0.3), seed=0)


def _accuracy(model: torch.nn.Module, task: DomainTask) -> float:
    with torch.no_grad():
        predicted = model.eval()(task.target_test_x).argmax(1)
    return float((predicted == task.target_test_y).float().mean())


def _train(task: DomainTask, *, self_training: bool) -> torch.nn.Module:
    tk.seed_everything(0)
    model = tk.models.SmallCNN(num_classes=task.num_classes, width=8)
    if self_training:
        tk.convert_domain_bn(model)
    recipe = tk.recipe("self_training", lr=0.03)
    optimizer = recipe.optimizer(model.parameters())
    scheduler = recipe.scheduler(optimizer, STEPS)
    labeler = tk.PseudoLabeler(task.num_classes, threshold=0.95, rampup_steps=STEPS)
    fixmatch = tk.FixMatchLoss(labeler, weak=tk.augment.weak, strong=tk.augment.strong)
    source = infinite(make_loader(task.source_x, task.source_y, batch_size=32, seed=0))
    target = infinite(make_loader(task.target_x, batch_size=32, drop_last=True, seed=1))
    model.train()
    for _ in range(STEPS):
        x_s, y_s = next(source)
        if self_training:
            with tk.bn_domain(model, "source"):
                loss = F.cross_entropy(model(tk.augment.weak(x_s)), y_s)
            with tk.bn_domain(model, "target"):
                loss = loss + fixmatch(model, next(target)[0])
            fixmatch.step()
        else:
            loss = F.cross_entropy(model(tk.augment.weak(x_s)), y_s)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model


@pytest.mark.slow
def test_adabn_and_self_training_beat_source_only_on_noisy_digits() -> None:
    torch.set_num_threads(1)
    task = _task()
    model = _train(task, self_training=False)
    source_only = _accuracy(model, task)
    tk.adapt_batchnorm(model, task.target_x, progress=False)
    adabn = _accuracy(model, task)
    student = _train(task, self_training=True)
    with tk.bn_domain(student, "target"):
        tk.adapt_batchnorm(student, task.target_x, progress=False)
        self_trained = _accuracy(student, task)
    assert adabn > source_only + 0.15, (source_only, adabn)
    assert self_trained > source_only + 0.15, (source_only, self_trained)

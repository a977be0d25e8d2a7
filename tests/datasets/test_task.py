"""DomainTask: the parts every task has, few-shot draws from the target, flat copies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from transferkit import datasets as D


def test_few_shot_draws_k_per_class_deterministically() -> None:
    task = D.digits("rotate")
    x, y = task.few_shot(3, seed=1)
    x2, y2 = task.few_shot(3, seed=1)
    x3, _ = task.few_shot(3, seed=2)
    assert x.shape == (30, 1, 16, 16)
    assert y.bincount().tolist() == [3] * 10
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    # the samples really come from the target training split with their true labels
    matches = (task.target_x.flatten(1)[None] == x.flatten(1)[:, None]).all(-1)
    rows = matches.float().argmax(1)
    assert bool(matches.any(1).all())
    assert torch.equal(task.target_y[rows], y)


def test_few_shot_rejects_too_many_or_bad_k() -> None:
    task = D.digits("rotate")
    with pytest.raises(ValueError, match="k: class"):
        task.few_shot(10_000)
    with pytest.raises(ValueError, match="k"):
        task.few_shot(0)


def test_domain_task_refuses_domains_of_different_input_formats() -> None:
    # fails before the fix: a uint8 (0-255) target next to float (0-1) source images, or
    # target images of another size, made a DomainTask without a word
    task = D.digits("none", size=8)
    with pytest.raises(ValueError, match=r"target_x: expected samples shaped \(1, 8, 8\)"):
        dataclasses.replace(task, target_x=(task.target_x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="target_test_x"):
        dataclasses.replace(task, target_test_x=task.target_test_x[:, :, :7])
    flat = task.flat()  # flattening keeps the parts consistent
    assert flat.target_x.shape[1:] == flat.source_x.shape[1:] == (64,)

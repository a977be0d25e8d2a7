"""adapt, reptile and fomaml: exact steps, trainable parameters only, seeded task streams."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk
from transferkit.meta import MetaTask, adapt, fomaml, reptile

loss_fn = nn.functional.cross_entropy


def manual_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float):
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return model


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def data(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_adapt_equals_plain_sgd_and_leaves_the_model_untouched() -> None:
    model = small_mlp()
    before = copy.deepcopy(model.state_dict())
    x, y = data(1)
    tuned = adapt(model, x, y, steps=4, lr=0.3)
    reference = manual_sgd(model, x, y, steps=4, lr=0.3)
    for (name, a), b in zip(
        tuned.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_reptile_step_moves_towards_the_mean_adapted_weights() -> None:
    model = small_mlp()
    tasks = [MetaTask(*data(10)), MetaTask(*data(11))]
    expected_fast = [manual_sgd(model, t.support_x, t.support_y, 3, 0.2) for t in tasks]
    theta = {k: v.clone() for k, v in model.named_parameters()}
    reptile(
        model,
        lambda s: tasks[s % 2],
        meta_steps=1,
        meta_batch_size=2,
        inner_steps=3,
        inner_lr=0.2,
        meta_lr=0.4,
    )
    for name, p in model.named_parameters():
        phi = torch.stack([dict(f.named_parameters())[name] for f in expected_fast]).mean(0)
        torch.testing.assert_close(p.detach(), theta[name] + 0.4 * (phi - theta[name]))


def test_fomaml_step_follows_the_query_gradient_at_the_adapted_weights() -> None:
    model = small_mlp()
    tasks = [MetaTask(*data(20), *data(21)), MetaTask(*data(22), *data(23))]
    meta_grad = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for task in tasks:
        fast = manual_sgd(model, task.support_x, task.support_y, 2, 0.1)
        fast.zero_grad()
        loss_fn(fast(task.query_x), task.query_y).backward()
        for name, p in fast.named_parameters():
            meta_grad[name] += p.grad / 2
    theta = {k: v.clone() for k, v in model.named_parameters()}
    fomaml(
        model,
        lambda s: tasks[s % 2],
        meta_steps=1,
        meta_batch_size=2,
        inner_steps=2,
        inner_lr=0.1,
        meta_optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[name] - 0.5 * meta_grad[name])


def test_meta_learning_only_changes_trainable_parameters() -> None:
    model = small_mlp()
    model[0].requires_grad_(False)
    frozen = model[0].weight.clone()
    reptile(model, [MetaTask(*data(3))], meta_steps=3, meta_batch_size=1)
    fomaml(model, [MetaTask(*data(3), *data(4))], meta_steps=3, meta_batch_size=1)
    assert torch.equal(model[0].weight, frozen)


def test_task_streams_are_reproducible_for_a_seed() -> None:
    pool = [MetaTask(*data(i)) for i in range(5)]
    a, b, c = small_mlp(), small_mlp(), small_mlp()
    reptile(a, pool, meta_steps=4, meta_batch_size=2, seed=3)
    reptile(b, pool, meta_steps=4, meta_batch_size=2, seed=3)
    reptile(c, pool, meta_steps=4, meta_batch_size=2, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_meta_learning_rejects_bad_arguments() -> None:
    model = small_mlp()
    with pytest.raises(ValueError, match="fomaml needs query"):
        fomaml(model, [MetaTask(*data(0))], meta_steps=1)
    with pytest.raises(ValueError, match="inner_steps"):
        reptile(model, [MetaTask(*data(0))], inner_steps=0)
    with pytest.raises(ValueError, match="tasks: expected at least one"):
        reptile(model, [])
    with pytest.raises(TypeError, match="tasks"):
        reptile(model, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="task"):
        reptile(model, lambda s: "not a task", meta_steps=1)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="support_y: expected 12 labels"):
        reptile(model, [MetaTask(data(0)[0], torch.zeros(5, dtype=torch.long))], meta_steps=1)
    with pytest.raises(ValueError, match="requires_grad"):
        reptile(model.requires_grad_(False), [MetaTask(*data(0))], meta_steps=1)


def line_task(task_seed: int, *, shots: int = 5, query: int = 50) -> MetaTask:
    """Binary tasks in 8-D labelled by a hyperplane near a shared direction w0."""
    g = torch.Generator().manual_seed(task_seed)
    w0 = torch.linspace(-1.0, 1.0, 8)
    w = w0 + 0.3 * torch.randn(8, generator=g)
    x = torch.randn(2 * shots + query, 8, generator=g)
    y = (x @ w > 0).long()
    return MetaTask(x[: 2 * shots], y[: 2 * shots], x[2 * shots :], y[2 * shots :])


def accuracy_after_adapting(model: nn.Module, seeds: range, steps: int) -> float:
    accuracies = []
    for s in seeds:
        task = line_task(s)
        tuned = adapt(model, task.support_x, task.support_y, steps=steps, lr=0.1)
        accuracies.append(float((tuned(task.query_x).argmax(1) == task.query_y).float().mean()))
    return float(np.mean(accuracies))


@pytest.mark.parametrize("algorithm", [reptile, fomaml])
def test_meta_learned_init_adapts_faster_than_random_init(algorithm) -> None:
    torch.manual_seed(0)
    random_init = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    meta_init = copy.deepcopy(random_init)
    kwargs = {"meta_lr": 0.5} if algorithm is reptile else {"meta_lr": 0.01}
    algorithm(meta_init, line_task, meta_steps=150, inner_steps=3, inner_lr=0.1, **kwargs)
    new_tasks = range(10_000, 10_020)  # never seen in meta-training
    random_acc = accuracy_after_adapting(random_init, new_tasks, steps=3)
    meta_acc = accuracy_after_adapting(meta_init, new_tasks, steps=3)
    assert meta_acc > random_acc + 0.15
    assert meta_acc > 0.8


def test_public_objects_name_the_package_not_its_private_files() -> None:
    # pickled task pools and reprs stay as before the package split
    for name in tk.meta.__all__:
        assert getattr(tk.meta, name).__module__ == "transferkit.meta", name
    task = MetaTask(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    assert b"transferkit.meta._" not in pickle.dumps(task)

"""First-order meta-learning of an initialisation: [`reptile`][], [`fomaml`][], [`adapt`][]."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._validation import (
    check_bool,
    check_labels,
    check_module_data,
    check_positive,
    check_tensor,
)

logger = logging.getLogger("transferkit.meta")

LossFn = Callable[[Tensor, Tensor], Tensor]
TaskSource = Sequence["MetaTask"] | Callable[[int], "MetaTask"]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class MetaTask(NamedTuple):
    """One small task: labelled support samples to adapt on, query samples to evaluate.

    ``query_x``/``query_y`` may be ``None`` for [`reptile`][] (which adapts on all of a
    task's data); [`fomaml`][] needs them.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor | None = None
    query_y: Tensor | None = None


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    params: dict[str, Tensor] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model: expected at least one parameter with requires_grad=True")
    return params


def _check_task(task: object, index: int, *, need_query: bool) -> MetaTask:
    if not isinstance(task, tuple) or len(task) not in (2, 4):
        raise TypeError(
            f"tasks: task {index} should be a MetaTask (support_x, support_y[, query_x, "
            f"query_y]), got {type(task).__name__}"
        )
    task = MetaTask(*task)
    check_tensor(task.support_x, "support_x", min_samples=1)
    check_labels(task.support_y, "support_y", num_samples=task.support_x.shape[0])
    if task.query_x is None or task.query_y is None:
        if need_query:
            raise ValueError(f"tasks: task {index} has no query set; fomaml needs query_x/y")
    else:
        check_tensor(task.query_x, "query_x", min_samples=1)
        check_labels(task.query_y, "query_y", num_samples=task.query_x.shape[0])
    return task


def _adapted(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """``steps`` plain SGD steps on ``(x, y)`` starting at ``params``, first-order."""
    current = {name: p.detach().requires_grad_(True) for name, p in params.items()}
    for _ in range(steps):
        with torch.enable_grad():
            loss = loss_fn(functional_call(model, current, (x,)), y)
            grads = torch.autograd.grad(loss, list(current.values()))
        current = {
            name: (p - lr * g).detach().requires_grad_(True)
            for (name, p), g in zip(current.items(), grads, strict=True)
        }
    return current


def adapt(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 10,
    lr: float = 0.1,
    loss_fn: LossFn = nn.functional.cross_entropy,
) -> nn.Module:
    """Fine-tune a copy of ``model`` with ``steps`` full-batch SGD steps on ``(x, y)``.

    This is the inner loop of [`reptile`][] and [`fomaml`][]; use it to evaluate a
    meta-learned (or any) initialisation on a new task. Only parameters with
    ``requires_grad=True`` change; ``model`` itself is left untouched.

    Args:
        model: the initialisation.
        x: support inputs.
        y: support labels (or targets of ``loss_fn``).
        steps: gradient steps (0 returns an unchanged copy).
        lr: SGD step size.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.

    Returns:
        An adapted deep copy of ``model``.

    Shape:
        - ``x``: ``(N, ...)``; ``y``: ``(N, ...)``.

    Raises:
        ValueError: bad ``steps``/``lr``, no trainable parameters, NaN inputs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(2, 2)
        >>> x, y = torch.randn(20, 2), (torch.randn(20) > 0).long()
        >>> loss = nn.functional.cross_entropy
        >>> tuned = adapt(model, x, y, steps=20, lr=0.5)
        >>> bool(loss(tuned(x), y) < loss(model(x), y))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_module_data(model, "model")
    check_tensor(x, "x", min_samples=1)
    check_tensor(y, "y", finite=True)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y: expected {x.shape[0]} targets to match x, got {y.shape[0]}")
    check_positive(steps, "steps", strict=False, integer=True)
    check_positive(lr, "lr")
    copied = copy.deepcopy(model)
    params = _adapted(
        copied, _trainable(copied), x, y, steps=int(steps), lr=float(lr), loss_fn=loss_fn
    )
    with torch.no_grad():
        for name, p in copied.named_parameters():
            if name in params:
                p.copy_(params[name])
    return copied


def _meta_train(
    model: nn.Module,
    tasks: TaskSource,
    *,
    algorithm: Literal["reptile", "fomaml"],
    meta_steps: int,
    meta_batch_size: int,
    inner_steps: int,
    inner_lr: float,
    meta_lr: float,
    meta_optimizer: OptimizerFactory | None,
    loss_fn: LossFn,
    seed: int,
    progress: bool,
) -> list[float]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for value, name in (
        (meta_steps, "meta_steps"),
        (meta_batch_size, "meta_batch_size"),
        (inner_steps, "inner_steps"),
    ):
        check_positive(value, name, integer=True)
    check_positive(inner_lr, "inner_lr")
    check_positive(meta_lr, "meta_lr")
    check_bool(progress, "progress")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(tasks, Sequence):
        if len(tasks) == 0:
            raise ValueError("tasks: expected at least one task")
        pool = tasks

        def draw_from_pool(task_seed: int) -> MetaTask:
            index = int(torch.randint(len(pool), (1,), generator=generator))
            return pool[index]

        draw: Callable[[int], MetaTask] = draw_from_pool
    elif callable(tasks):
        draw = tasks
    else:
        raise TypeError(
            "tasks: expected a sequence of MetaTask or a function task_seed -> MetaTask, got "
            f"{type(tasks).__name__}"
        )
    params = _trainable(model)
    device = next(iter(params.values())).device
    if meta_optimizer is None:
        optimizer: torch.optim.Optimizer = (
            torch.optim.SGD(params.values(), lr=meta_lr)
            if algorithm == "reptile"
            else torch.optim.Adam(params.values(), lr=meta_lr)
        )
    else:
        optimizer = meta_optimizer(params.values())  # type: ignore[arg-type]
    from tqdm.auto import tqdm

    history: list[float] = []
    for step in tqdm(range(meta_steps), disable=not progress, desc=algorithm):
        meta_grads = {name: torch.zeros_like(p) for name, p in params.items()}
        step_loss = 0.0
        for b in range(meta_batch_size):
            task_seed = seed * 1_000_003 + step * meta_batch_size + b
            task = _check_task(draw(task_seed), task_seed, need_query=algorithm == "fomaml")
            task = MetaTask(
                task.support_x.to(device),
                task.support_y.to(device),
                None if task.query_x is None else task.query_x.to(device),
                None if task.query_y is None else task.query_y.to(device),
            )
            if algorithm == "reptile":
                x, y = task.support_x, task.support_y
                if task.query_x is not None and task.query_y is not None:
                    x, y = torch.cat([x, task.query_x]), torch.cat([y, task.query_y])
                fast = _adapted(
                    model, params, x, y, steps=inner_steps, lr=inner_lr, loss_fn=loss_fn
                )
                with torch.no_grad():
                    step_loss += float(loss_fn(functional_call(model, fast, (x,)), y))
                    for name, p in params.items():
                        meta_grads[name] += (p.detach() - fast[name]) / meta_batch_size
            else:
                fast = _adapted(
                    model,
                    params,
                    task.support_x,
                    task.support_y,
                    steps=inner_steps,
                    lr=inner_lr,
                    loss_fn=loss_fn,
                )
                query_x, query_y = task.query_x, task.query_y
                if query_x is None or query_y is None:  # rejected by _check_task
                    raise ValueError("tasks: fomaml needs query_x and query_y")
                with torch.enable_grad():
                    query_loss = loss_fn(functional_call(model, fast, (query_x,)), query_y)
                    grads = torch.autograd.grad(query_loss, list(fast.values()))
                step_loss += float(query_loss.detach())
                for name, g in zip(fast, grads, strict=True):
                    meta_grads[name] += g / meta_batch_size
        optimizer.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.grad = meta_grads[name]
        optimizer.step()
        history.append(step_loss / meta_batch_size)
        if (step + 1) % max(1, meta_steps // 10) == 0:
            logger.info("%s step %d: adapted loss %.4f", algorithm, step + 1, history[-1])
    return history


def reptile(
    model: nn.Module,
    tasks: TaskSource,
    *,
    meta_steps: int = 500,
    meta_batch_size: int = 5,
    inner_steps: int = 5,
    inner_lr: float = 0.1,
    meta_lr: float = 0.5,
    meta_optimizer: OptimizerFactory | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    r"""Meta-learn an initialisation of ``model`` with Reptile (Nichol et al., 2018), in place.

    Each meta step draws ``meta_batch_size`` tasks, adapts the current parameters
    $\theta$ to each with ``inner_steps`` full-batch SGD steps (on the support set,
    plus the query set when the task has one) giving $\phi_k$, and moves
    $\theta \leftarrow \theta + \epsilon (\bar\phi - \theta)$ with
    $\epsilon$ = ``meta_lr`` (implemented as an SGD step on the pseudo-gradient
    $\theta - \bar\phi$, so ``meta_optimizer`` may swap in e.g. Adam).

    Tasks are *seed-described*: ``tasks`` is either a function ``task_seed -> MetaTask``
    (called with ``seed * 1_000_003 + step * meta_batch_size + k``, so a run is
    reproducible and tasks never repeat), or a sequence of tasks drawn at random with a
    generator seeded by ``seed``.

    Only parameters with ``requires_grad=True`` are meta-learned. The module's
    train/eval mode is left as it is (BatchNorm layers in train mode update their running
    statistics during the inner loops).

    Args:
        model: the network or head to initialise (modified in place).
        tasks: a function of a task seed, or a sequence of [`MetaTask`][].
        meta_steps: outer iterations.
        meta_batch_size: tasks per outer iteration.
        inner_steps: SGD steps per task.
        inner_lr: SGD step size of the inner loop.
        meta_lr: outer step size $\epsilon$.
        meta_optimizer: ``params -> Optimizer`` to replace the default SGD(``meta_lr``).
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        seed: seed of the task stream.
        progress: show a tqdm progress bar.

    Returns:
        The mean post-adaptation training loss of each meta step.

    Raises:
        ValueError: bad hyper-parameters, no trainable parameters, malformed tasks.
        TypeError: ``tasks`` of the wrong type.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> def task(task_seed):  # 2-D points labelled by a slightly rotated line
        ...     g = torch.Generator().manual_seed(task_seed)
        ...     x = torch.randn(10, 2, generator=g)
        ...     w = torch.tensor([1.0, 0.3]) + 0.1 * torch.randn(2, generator=g)
        ...     return MetaTask(x, (x @ w > 0).long())
        >>> _ = torch.manual_seed(0)
        >>> head = nn.Linear(2, 2)
        >>> losses = reptile(head, task, meta_steps=20, meta_batch_size=2, inner_steps=3)
        >>> losses[-1] < losses[0]
        True
    """
    return _meta_train(
        model,
        tasks,
        algorithm="reptile",
        meta_steps=meta_steps,
        meta_batch_size=meta_batch_size,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_optimizer=meta_optimizer,
        loss_fn=loss_fn,
        seed=seed,
        progress=progress,
    )


def fomaml(
    model: nn.Module,
    tasks: TaskSource,
    *,
    meta_steps: int = 500,
    meta_batch_size: int = 5,
    inner_steps: int = 5,
    inner_lr: float = 0.1,
    meta_lr: float = 1e-2,
    meta_optimizer: OptimizerFactory | None = None,
    loss_fn: LossFn = nn.functional.cross_entropy,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    r"""Meta-learn an initialisation with first-order MAML (Finn et al., 2017), in place.

    Each meta step draws ``meta_batch_size`` tasks, adapts the current parameters
    $\theta$ to each task's support set with ``inner_steps`` SGD steps giving
    $\phi_k$, and takes one ``meta_optimizer`` step (default Adam with
    ``meta_lr``) along the first-order meta-gradient
    $\frac1K \sum_k \nabla_\phi L_{\text{query}_k}(\phi_k)$: the query-set gradient
    at the adapted parameters, without differentiating through the inner loop.

    Tasks, trainable parameters and module modes are handled as in [`reptile`][];
    every task needs a query set.

    Args:
        model: the network or head to initialise (modified in place).
        tasks: a function of a task seed, or a sequence of [`MetaTask`][].
        meta_steps: outer iterations.
        meta_batch_size: tasks per outer iteration.
        inner_steps: SGD steps on each support set.
        inner_lr: SGD step size of the inner loop.
        meta_lr: learning rate of the default Adam meta-optimizer.
        meta_optimizer: ``params -> Optimizer`` to replace the default.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        seed: seed of the task stream.
        progress: show a tqdm progress bar.

    Returns:
        The mean query loss after adaptation of each meta step.

    Raises:
        ValueError: bad hyper-parameters, no trainable parameters, tasks without a query.
        TypeError: ``tasks`` of the wrong type.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> def task(task_seed):
        ...     g = torch.Generator().manual_seed(task_seed)
        ...     x = torch.randn(20, 2, generator=g)
        ...     y = (x @ torch.tensor([1.0, 0.3]) > 0).long()
        ...     return MetaTask(x[:10], y[:10], x[10:], y[10:])
        >>> _ = torch.manual_seed(0)
        >>> losses = fomaml(nn.Linear(2, 2), task, meta_steps=20, meta_batch_size=2, meta_lr=0.1)
        >>> losses[-1] < losses[0]
        True
    """
    return _meta_train(
        model,
        tasks,
        algorithm="fomaml",
        meta_steps=meta_steps,
        meta_batch_size=meta_batch_size,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        meta_lr=meta_lr,
        meta_optimizer=meta_optimizer,
        loss_fn=loss_fn,
        seed=seed,
        progress=progress,
    )

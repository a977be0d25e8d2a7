"""The domain-adaptation task every loader returns, and the seeded splits that build it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .._validation import check_labels, check_positive, check_seed, check_tensor

# inputs and labels of one part of a domain, e.g. the source training split
Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DomainTask:
    """A domain-adaptation task: labelled source, unlabelled target, labelled target test.

    Attributes:
        name: a short description, e.g. ``"digits[rotate(45)]"``.
        num_classes: number of classes.
        source_x: labelled source training inputs, ``(N_s, ...)`` float32.
        source_y: their labels, ``(N_s,)`` int64.
        source_test_x: held-out source inputs.
        source_test_y: their labels.
        target_x: unlabelled target training inputs, ``(N_t, ...)`` float32.
        target_test_x: held-out target inputs for evaluation.
        target_test_y: their labels.
        target_y: the hidden labels of ``target_x``. Unsupervised adaptation must not use
            them; they serve [`few_shot`][] and target-supervised (oracle) baselines.

    All four input tensors share one sample shape and dtype (a ``ValueError`` names the
    part that differs), so the domains cannot silently differ in format.

    Examples:
        >>> from transferkit.datasets import digits
        >>> task = digits("invert", seed=0)
        >>> task.source_x.shape[1:], task.num_classes
        (torch.Size([1, 16, 16]), 10)
    """

    name: str
    num_classes: int
    source_x: Tensor
    source_y: Tensor
    source_test_x: Tensor
    source_test_y: Tensor
    target_x: Tensor
    target_test_x: Tensor
    target_test_y: Tensor
    target_y: Tensor = field(repr=False)

    def __post_init__(self) -> None:
        classes = int(check_positive(self.num_classes, "num_classes", integer=True))
        for x_name, y_name in (
            ("source_x", "source_y"),
            ("source_test_x", "source_test_y"),
            ("target_x", "target_y"),
            ("target_test_x", "target_test_y"),
        ):
            x = check_tensor(getattr(self, x_name), x_name, finite=False)
            check_labels(getattr(self, y_name), y_name, num_samples=x.shape[0], num_classes=classes)
            # one input format for all parts: a uint8 (0-255) target next to float (0-1)
            # source images, or another image size, would otherwise pass silently
            if x.shape[1:] != self.source_x.shape[1:] or x.dtype != self.source_x.dtype:
                raise ValueError(
                    f"{x_name}: expected samples shaped {tuple(self.source_x.shape[1:])} of "
                    f"dtype {self.source_x.dtype} like source_x, got "
                    f"{tuple(x.shape[1:])} of dtype {x.dtype}"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, e.g. ``(1, 16, 16)``."""
        return tuple(self.source_x.shape[1:])

    def few_shot(self, k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Draw ``k`` labelled samples per class from the target training split.

        Args:
            k: samples per class (at least 1, at most the smallest class size).
            seed: seed of the draw; the same seed gives the same samples.

        Returns:
            ``(x, y)`` with ``k * num_classes`` samples, ordered by class.

        Examples:
            >>> from transferkit.datasets import digits
            >>> x, y = digits("rotate").few_shot(5)
            >>> x.shape[0], y.bincount().tolist()
            (50, [5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
        """
        check_positive(k, "k", integer=True)
        rng = np.random.default_rng(check_seed(seed))
        labels = self.target_y.numpy()
        chosen: list[np.ndarray] = []
        for cls in range(self.num_classes):
            members = np.flatnonzero(labels == cls)
            if members.size < k:
                raise ValueError(
                    f"k: class {cls} has only {members.size} target samples, cannot draw {k}"
                )
            chosen.append(np.sort(rng.choice(members, size=k, replace=False)))
        index = torch.from_numpy(np.concatenate(chosen))
        return self.target_x[index].clone(), self.target_y[index].clone()

    def flat(self) -> DomainTask:
        """Return a copy whose inputs are flattened to ``(N, D)`` (for scikit-learn).

        Examples:
            >>> from transferkit.datasets import digits
            >>> digits("noise").flat().source_x.shape[1]
            256
        """

        def flatten(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], -1).clone()

        return dataclasses.replace(
            self,
            source_x=flatten(self.source_x),
            source_test_x=flatten(self.source_test_x),
            target_x=flatten(self.target_x),
            target_test_x=flatten(self.target_test_x),
        )


def make_task(
    name: str, num_classes: int, *, source: Pair, source_test: Pair, target: Pair, target_test: Pair
) -> DomainTask:
    """A [`DomainTask`][] from its four ``(x, y)`` parts (``target``'s labels stay hidden)."""
    return DomainTask(
        name=name,
        num_classes=num_classes,
        source_x=source[0],
        source_y=source[1],
        source_test_x=source_test[0],
        source_test_y=source_test[1],
        target_x=target[0],
        target_test_x=target_test[0],
        target_test_y=target_test[1],
        target_y=target[1],
    )


def split_pair(x: Tensor, y: Tensor, train: np.ndarray, test: np.ndarray) -> tuple[Pair, Pair]:
    """Copies of the ``train`` and ``test`` rows of one domain's ``(x, y)``."""
    train_index, test_index = torch.from_numpy(train), torch.from_numpy(test)
    return (x[train_index], y[train_index]), (x[test_index], y[test_index])


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that ``fraction`` of every class goes to the second part.

    Both parts are sorted; the first is typically the training and the second the test
    split (``fraction`` = the test fraction).
    """
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = round(len(members) * fraction)
        second.append(members[:cut])
        first.append(members[cut:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` sorted indices keeping the class proportions of ``labels``."""
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        take = max(1, round(size * len(members) / len(labels)))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def seeded_subset(
    n_total: int, size: int | None, rng: np.random.Generator, name: str
) -> np.ndarray:
    """``size`` sorted indices drawn from ``range(n_total)`` (``None``: all of them)."""
    if size is None:
        return np.arange(n_total)
    check_positive(size, name, integer=True)
    if size > n_total:
        raise ValueError(f"{name}: expected at most {n_total}, got {size}")
    return np.sort(rng.choice(n_total, size=size, replace=False))


def split_domains(
    name: str,
    num_classes: int,
    source: Pair,
    target: Pair,
    *,
    test_fraction: float,
    rng: np.random.Generator,
) -> DomainTask:
    """A task from two whole domains, each split (stratified, seeded) into train and test."""
    s_train, s_test = stratified_split(source[1].numpy(), test_fraction, rng)
    t_train, t_test = stratified_split(target[1].numpy(), test_fraction, rng)
    source_train, source_test = split_pair(*source, s_train, s_test)
    target_train, target_test = split_pair(*target, t_train, t_test)
    return make_task(
        name,
        num_classes,
        source=source_train,
        source_test=source_test,
        target=target_train,
        target_test=target_test,
    )

"""Decision boundaries: the class regions of a 2-D classifier with the points on top."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .._validation import check_positive
from ._common import (
    SOURCE_MARKER,
    TARGET_MARKER,
    ArrayLike,
    as_features,
    as_labels,
    class_colours,
    new_axes,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _predict_grid(model: object, grid: np.ndarray, batch_size: int) -> np.ndarray:
    """Class predictions on the grid from a torch module, a callable or an estimator."""
    if isinstance(model, nn.Module):
        try:
            parameter = next(model.parameters())
            device, dtype = parameter.device, parameter.dtype
        except StopIteration:
            device, dtype = torch.device("cpu"), torch.float32
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                chunks = [
                    model(torch.as_tensor(grid[i : i + batch_size], dtype=dtype, device=device))
                    for i in range(0, grid.shape[0], batch_size)
                ]
        finally:
            model.train(was_training)
        return _to_classes(torch.cat(chunks), grid.shape[0])
    predict = getattr(model, "predict", None)
    if callable(predict):
        return np.asarray(predict(grid.astype(np.float32))).astype(np.int64).reshape(-1)
    if callable(model):
        fn: Callable[[Tensor], Any] = model
        with torch.inference_mode():
            out = fn(torch.as_tensor(grid, dtype=torch.float32))
        return _to_classes(out, grid.shape[0])
    raise TypeError(
        "model: expected an nn.Module, a callable returning logits, or an object with "
        f"predict(), got {type(model).__name__}"
    )


def _to_classes(out: object, n: int) -> np.ndarray:
    if not isinstance(out, Tensor):
        out = torch.as_tensor(np.asarray(out))
    if out.dim() == 2 and out.shape[0] == n:
        if out.shape[1] == 1:  # one logit: binary classifier
            return (out[:, 0] > 0).long().cpu().numpy()
        return out.argmax(1).cpu().numpy()
    if out.dim() == 1 and out.shape[0] == n:
        if out.is_floating_point():
            return (out > 0).long().cpu().numpy()
        return out.long().cpu().numpy()
    raise ValueError(
        f"model: expected logits of shape ({n}, C) or ({n},) on the grid, got {tuple(out.shape)}"
    )


def decision_boundary(
    model: nn.Module | Callable[[Tensor], Tensor] | Any,
    x: ArrayLike,
    y: ArrayLike | None = None,
    *,
    target_x: ArrayLike | None = None,
    target_y: ArrayLike | None = None,
    ax: Axes | None = None,
    resolution: int = 200,
    margin: float = 0.5,
    batch_size: int = 8192,
    title: str | None = None,
    alpha: float = 0.25,
) -> Axes:
    """Draw the class regions of a 2-D classifier with the data points on top.

    The model is evaluated on a ``resolution x resolution`` grid covering the points
    (plus ``margin``) and the predicted class is shown as filled regions; ``x`` (e.g.
    the source) is drawn as circles coloured by ``y``, ``target_x`` as crosses. A torch
    module is run in eval mode under ``torch.inference_mode`` on its own device and
    dtype, and its train/eval mode is restored afterwards; its weights are not changed.

    Args:
        model: an ``nn.Module`` or callable returning logits ``(M, C)`` (or one logit
            per point, ``(M,)``/``(M, 1)``, thresholded at 0), or a fitted scikit-learn
            classifier with ``predict``.
        x: the points to draw (e.g. source inputs).
        y: their integer class labels; grey when ``None``.
        target_x: optional second set of points (e.g. the shifted target domain).
        target_y: their labels; grey when ``None``.
        ax: the Axes to draw into; a new figure when ``None``.
        resolution: grid points per axis (``>= 2``).
        margin: how far the grid extends beyond the points, in input units.
        batch_size: grid points per forward pass.
        title: the Axes title.
        alpha: opacity of the class regions.

    Returns:
        The Axes, holding one filled contour set (the regions) and one scatter
        collection per point set.

    Shape:
        - x: ``(N, 2)``, y: ``(N,)``; target_x: ``(M, 2)``, target_y: ``(M,)``.

    Raises:
        TypeError: wrong input types or a ``model`` that is neither callable nor an
            estimator.
        ValueError: inputs that are not 2-D points, NaN/inf, mismatched labels, a
            ``resolution`` below 2, or model outputs of the wrong shape.
        ImportError: matplotlib is missing.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import torch
        >>> import transferkit as tk
        >>> from transferkit import plot
        >>> task = tk.datasets.moons(n_samples=60)
        >>> model = tk.models.MLP(2, 2, hidden=(8,))
        >>> ax = plot.decision_boundary(model, task.source_x, task.source_y,
        ...                             target_x=task.target_x, resolution=50)
        >>> len(ax.collections) >= 2
        True
        >>> import matplotlib.pyplot as plt; plt.close(ax.figure)
    """
    points = as_features(x, "x", min_samples=1)
    if points.shape[1] != 2:
        raise ValueError(f"x: expected 2-D points of shape (N, 2), got {points.shape}")
    labels = None if y is None else as_labels(y, "y", points.shape[0])
    target_points: np.ndarray | None = None
    target_labels: np.ndarray | None = None
    if target_x is not None:
        target_points = as_features(target_x, "target_x", min_samples=1)
        if target_points.shape[1] != 2:
            raise ValueError(
                f"target_x: expected 2-D points of shape (M, 2), got {target_points.shape}"
            )
        if target_y is not None:
            target_labels = as_labels(target_y, "target_y", target_points.shape[0])
    elif target_y is not None:
        raise ValueError("target_y: given without target_x")
    resolution = int(check_positive(resolution, "resolution", integer=True))
    if resolution < 2:
        raise ValueError(f"resolution: expected at least 2, got {resolution}")
    margin = check_positive(margin, "margin", strict=False)
    batch_size = int(check_positive(batch_size, "batch_size", integer=True))
    if not (callable(model) or callable(getattr(model, "predict", None))):
        raise TypeError(
            "model: expected an nn.Module, a callable returning logits, or an object with "
            f"predict(), got {type(model).__name__}"
        )

    every = points if target_points is None else np.concatenate([points, target_points])
    low = every.min(axis=0) - margin
    high = every.max(axis=0) + margin
    span = np.where(high - low > 0, high - low, 1.0)
    high = low + span
    grid_x, grid_y = np.meshgrid(
        np.linspace(low[0], high[0], resolution), np.linspace(low[1], high[1], resolution)
    )
    grid = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    predicted = _predict_grid(model, grid, batch_size).reshape(resolution, resolution)

    ax = new_axes(ax)
    known = [predicted]
    if labels is not None:
        known.append(labels)
    if target_labels is not None:
        known.append(target_labels)
    classes = np.unique(np.concatenate([k.ravel() for k in known]))
    colours = class_colours(classes)
    index = {int(c): i for i, c in enumerate(classes)}
    region = np.vectorize(index.__getitem__)(predicted) if predicted.size else predicted
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([colours[int(c)] for c in classes])
    levels = np.arange(len(classes) + 1) - 0.5
    ax.contourf(
        grid_x,
        grid_y,
        region,
        levels=levels,
        cmap=cmap,
        alpha=alpha,
        vmin=levels[0],
        vmax=levels[-1],
    )

    def scatter(xy: np.ndarray, lab: np.ndarray | None, label: str, **style: Any) -> None:
        colour: Any = "0.4" if lab is None or not len(xy) else [colours[int(c)] for c in lab]
        ax.scatter(xy[:, 0], xy[:, 1], c=colour, label=label, **style)

    scatter(points, labels, "source", marker=SOURCE_MARKER, s=14, edgecolors="k", linewidths=0.3)
    if target_points is not None:
        scatter(target_points, target_labels, "target", marker=TARGET_MARKER, s=18, linewidths=1.0)
        from matplotlib.lines import Line2D

        # neutral legend markers: the points themselves are coloured by class
        handles = [
            Line2D([], [], marker=m, color="0.3", linestyle="", label=name)
            for m, name in ((SOURCE_MARKER, "source"), (TARGET_MARKER, "target"))
        ]
        ax.legend(handles=handles, loc="best", fontsize="small")
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    if title is not None:
        ax.set_title(title)
    return ax

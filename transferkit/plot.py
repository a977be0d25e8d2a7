"""Pictures of a transfer run: feature embeddings, training curves, decision boundaries.

This module needs matplotlib, the ``plot`` extra (``pip install 'transferkit[plot]'``);
it is imported only when you call a function here, so ``import transferkit`` works
without it. Every function draws into the ``ax`` you pass (or a new figure made with
``matplotlib.pyplot.subplots``) and returns that ``Axes``; none of them calls
``plt.show()``. Write figures with [`save`][], which replaces the file atomically.

* [`embedding`][] -- source vs target features in 2-D (t-SNE or PCA): the picture of
  domain shift, before and after adaptation.
* [`curves`][] -- loss and accuracy per epoch from a ``history`` dict.
* [`decision_boundary`][] -- the class regions of a classifier on a 2-D task (e.g.
  [`transferkit.datasets.moons`][]), with source and target points on top.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._io import atomic_path
from ._validation import check_bool, check_features, check_labels, check_option, check_positive

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["curves", "decision_boundary", "embedding", "save"]

logger = logging.getLogger(__name__)

EmbeddingMethod = Literal["tsne", "pca"]
ArrayLike = Tensor | np.ndarray

_SOURCE_MARKER = "o"
_TARGET_MARKER = "x"


def _pyplot() -> ModuleType:
    """Import ``matplotlib.pyplot`` or explain how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "transferkit.plot needs matplotlib, which is not installed; install the "
            "'plot' extra: pip install 'transferkit[plot]'"
        ) from error
    return plt


def _new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        from matplotlib.axes import Axes as AxesType

        if not isinstance(ax, AxesType):
            raise TypeError(f"ax: expected a matplotlib Axes or None, got {type(ax).__name__}")
        return ax
    _, new_ax = _pyplot().subplots(figsize=(6.0, 5.0))
    return new_ax  # type: ignore[no-any-return]


def _as_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        array = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)
        return torch.from_numpy(np.ascontiguousarray(array))
    if isinstance(x, Tensor):
        return x.detach()
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _as_features(x: object, name: str, *, min_samples: int) -> np.ndarray:
    tensor = check_features(_as_tensor(x, name), name, min_samples=min_samples)
    return tensor.cpu().to(torch.float64).numpy()


def _as_labels(y: object, name: str, num_samples: int) -> np.ndarray:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.asarray(y))
    elif isinstance(y, (list, tuple)):
        y = torch.as_tensor(y)
    labels = check_labels(y, name, num_samples=num_samples)
    return labels.cpu().numpy().astype(np.int64)


def _subsample(n: int, max_points: int, rng: np.random.Generator) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def embedding(
    source_features: ArrayLike,
    target_features: ArrayLike,
    *,
    method: EmbeddingMethod = "tsne",
    labels: tuple[ArrayLike | None, ArrayLike | None] | None = None,
    ax: Axes | None = None,
    max_points: int = 500,
    perplexity: float = 30.0,
    seed: int = 0,
    title: str | None = None,
    point_size: float = 12.0,
    alpha: float = 0.6,
) -> Axes:
    """Scatter source and target features in 2-D, embedded jointly by t-SNE or PCA.

    Both domains are embedded together (one t-SNE/PCA fit on the stacked features), so
    their distance in the picture reflects their distance in feature space: aligned
    domains overlap, shifted ones form separate clouds. Source points are drawn as
    circles, target points as crosses. Without ``labels`` the colour is the domain;
    with ``labels`` the colour is the class (tab10/tab20 colours) and the marker the
    domain.

    Args:
        source_features: source features.
        target_features: target features, with the same number of columns.
        method: ``"tsne"`` (`sklearn.manifold.TSNE`, ``init="pca"``; exact
            gradients up to 500 points, Barnes-Hut above) or ``"pca"``.
        labels: optional ``(source_labels, target_labels)``; either may be ``None``
            (e.g. an unlabelled target, drawn in grey).
        ax: the Axes to draw into; a new figure when ``None``.
        max_points: at most this many points per domain are drawn (a seeded random
            subset), keeping t-SNE fast.
        perplexity: t-SNE perplexity; lowered automatically for tiny inputs.
        seed: seeds the subsampling and t-SNE.
        title: the Axes title; a default names the method.
        point_size: marker size.
        alpha: marker opacity.

    Returns:
        The Axes drawn into: one scatter collection per domain (per domain and class
        when ``labels`` are given), a legend and no ticks.

    Shape:
        - source_features: ``(N_s, D)``, target_features: ``(N_t, D)``, with
          ``N_s, N_t >= 2`` and ``D >= 2``.
        - labels: ``((N_s,), (N_t,))`` integer class indices.

    Raises:
        TypeError: inputs are not tensors/arrays, or labels are not integers.
        ValueError: wrong rank, NaN/inf, too few samples, mismatched dimensions, an
            unknown ``method``, or labels of the wrong length.
        ImportError: matplotlib is missing.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import torch
        >>> from transferkit import plot
        >>> ax = plot.embedding(torch.randn(50, 8), torch.randn(40, 8) + 2, method="pca")
        >>> [text.get_text() for text in ax.get_legend().get_texts()]
        ['source', 'target']
        >>> import matplotlib.pyplot as plt; plt.close(ax.figure)
    """
    method = check_option(method, "method", ("tsne", "pca"))
    source = _as_features(source_features, "source_features", min_samples=2)
    target = _as_features(target_features, "target_features", min_samples=2)
    if source.shape[1] != target.shape[1]:
        raise ValueError(
            "source_features and target_features: expected the same number of columns, "
            f"got {source.shape[1]} and {target.shape[1]}"
        )
    if source.shape[1] < 2:
        raise ValueError(
            f"source_features: expected at least 2 feature columns to embed in 2-D, "
            f"got {source.shape[1]}"
        )
    max_points = int(check_positive(max_points, "max_points", integer=True))
    if max_points < 2:
        raise ValueError(f"max_points: expected at least 2, got {max_points}")
    check_positive(perplexity, "perplexity")
    source_labels: np.ndarray | None = None
    target_labels: np.ndarray | None = None
    if labels is not None:
        if not isinstance(labels, tuple) or len(labels) != 2:
            raise TypeError(
                "labels: expected a pair (source_labels, target_labels), either may be None"
            )
        if labels[0] is not None:
            source_labels = _as_labels(labels[0], "labels[0]", source.shape[0])
        if labels[1] is not None:
            target_labels = _as_labels(labels[1], "labels[1]", target.shape[0])
    ax = _new_axes(ax)

    rng = np.random.default_rng(seed)
    keep_source = _subsample(source.shape[0], max_points, rng)
    keep_target = _subsample(target.shape[0], max_points, rng)
    stacked = np.concatenate([source[keep_source], target[keep_target]])
    points = _embed(stacked, method, perplexity=perplexity, seed=seed)
    source_points, target_points = points[: len(keep_source)], points[len(keep_source) :]

    style: dict[str, Any] = {"s": point_size, "alpha": alpha}
    if source_labels is None and target_labels is None:
        ax.scatter(
            source_points[:, 0],
            source_points[:, 1],
            marker=_SOURCE_MARKER,
            c="C0",
            label="source",
            **style,
        )
        ax.scatter(
            target_points[:, 0],
            target_points[:, 1],
            marker=_TARGET_MARKER,
            c="C1",
            label="target",
            **style,
        )
    else:
        classes = np.unique(
            np.concatenate(
                [
                    source_labels[keep_source] if source_labels is not None else [],
                    target_labels[keep_target] if target_labels is not None else [],
                ]
            ).astype(np.int64)
        )
        colours = _class_colours(classes)
        for domain, domain_points, domain_labels, keep, marker in (
            ("source", source_points, source_labels, keep_source, _SOURCE_MARKER),
            ("target", target_points, target_labels, keep_target, _TARGET_MARKER),
        ):
            if domain_labels is None:
                ax.scatter(
                    domain_points[:, 0],
                    domain_points[:, 1],
                    marker=marker,
                    c="0.6",
                    label=f"{domain}",
                    **style,
                )
                continue
            kept = domain_labels[keep]
            for cls in np.unique(kept):
                mask = kept == cls
                ax.scatter(
                    domain_points[mask, 0],
                    domain_points[mask, 1],
                    marker=marker,
                    color=colours[int(cls)],
                    label=f"{domain} {int(cls)}",
                    **style,
                )
    ax.set_xticks([])
    ax.set_yticks([])
    name = "t-SNE" if method == "tsne" else "PCA"
    ax.set_title(title if title is not None else f"{name} of source and target features")
    ax.legend(loc="best", fontsize="small", markerscale=1.5, ncol=2 if labels else 1)
    return ax


def _embed(features: np.ndarray, method: str, *, perplexity: float, seed: int) -> np.ndarray:
    if method == "pca":
        from sklearn.decomposition import PCA

        result: np.ndarray = PCA(n_components=2, random_state=seed).fit_transform(features)
        return result
    from sklearn.manifold import TSNE

    n = features.shape[0]
    effective = min(float(perplexity), max(1.0, (n - 1) / 3.0))
    if effective < perplexity:
        logger.info("embedding: perplexity lowered to %.3g for %d points", effective, n)
    # Barnes-Hut only pays off for larger inputs; on a few hundred points exact is faster.
    algorithm = "exact" if n <= 500 else "barnes_hut"
    tsne = TSNE(
        n_components=2, perplexity=effective, init="pca", random_state=seed, method=algorithm
    )
    embedded: np.ndarray = tsne.fit_transform(features)
    return embedded


def _class_colours(classes: np.ndarray) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    size = 10 if len(classes) <= 10 else 20
    return {int(c): cmap(i % size) for i, c in enumerate(classes)}


def curves(
    history: Mapping[str, Sequence[float]],
    ax: Axes | None = None,
    *,
    xlabel: str = "epoch",
    title: str | None = None,
    split: bool = True,
) -> Axes:
    """Plot training curves: one line per entry of ``history``.

    ``history`` maps a name to its values per epoch (or per evaluation), e.g.
    ``{"train_loss": [...], "val_accuracy": [...]}``; series may differ in length and
    use ``nan`` for a missing value. With ``split=True`` and both kinds present, series
    whose name contains ``"loss"`` go on the left y-axis and the others (accuracies,
    scores) on a second y-axis on the right, so both keep a readable scale; one legend
    lists every line.

    Args:
        history: series name -> values (numbers, finite or ``nan``).
        ax: the Axes to draw into; a new figure when ``None``.
        xlabel: label of the x-axis; x runs from 1 to the length of each series.
        title: the Axes title.
        split: put non-loss series on a twin y-axis when losses are present too.

    Returns:
        The (left) Axes. When the right axis exists it is ``ax.figure.axes[-1]``; the
        legend on the left Axes lists every line.

    Raises:
        TypeError: ``history`` is not a mapping of names to sequences of numbers.
        ValueError: ``history`` or a series is empty, holds infinity, or is all ``nan``.
        ImportError: matplotlib is missing.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> from transferkit import plot
        >>> ax = plot.curves({"train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8, 0.7]})
        >>> [line.get_label() for line in ax.get_lines()]
        ['train_loss', 'val_loss']
        >>> import matplotlib.pyplot as plt; plt.close(ax.figure)
    """
    if not isinstance(history, Mapping):
        raise TypeError(
            f"history: expected a mapping of names to lists of values, got {type(history).__name__}"
        )
    if not history:
        raise ValueError("history: expected at least one series, got an empty mapping")
    series: dict[str, np.ndarray] = {}
    for name, values in history.items():
        if not isinstance(name, str):
            raise TypeError(f"history: expected string keys, got {type(name).__name__}")
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
            raise TypeError(
                f"history[{name!r}]: expected a sequence of numbers, got {type(values).__name__}"
            )
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"history[{name!r}]: expected a sequence of numbers") from error
        if array.ndim != 1 or array.size == 0:
            raise ValueError(
                f"history[{name!r}]: expected a non-empty 1-D sequence, got shape {array.shape}"
            )
        if np.isinf(array).any():
            raise ValueError(f"history[{name!r}]: expected finite values or nan, found inf")
        if np.isnan(array).all():
            raise ValueError(f"history[{name!r}]: every value is nan")
        series[name] = array
    check_bool(split, "split")
    ax = _new_axes(ax)
    losses = [name for name in series if "loss" in name.lower()]
    others = [name for name in series if name not in losses]
    right = ax.twinx() if split and losses and others else None
    for index, (name, array) in enumerate(series.items()):
        target_ax = right if right is not None and name in others else ax
        epochs = np.arange(1, array.size + 1)
        style = "--" if target_ax is right else "-"
        marker = "o" if array.size <= 30 else None
        target_ax.plot(
            epochs, array, style, color=f"C{index % 10}", marker=marker, ms=3, label=name
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    if right is not None:
        ax.set_ylabel("loss")
        right.set_ylabel("metric")
        handles = ax.get_lines() + right.get_lines()
        ax.legend(handles, [str(h.get_label()) for h in handles], loc="best", fontsize="small")
    else:
        ax.set_ylabel("loss" if not others else ("value" if losses else "metric"))
        ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    if title is not None:
        ax.set_title(title)
    return ax


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
    points = _as_features(x, "x", min_samples=1)
    if points.shape[1] != 2:
        raise ValueError(f"x: expected 2-D points of shape (N, 2), got {points.shape}")
    labels = None if y is None else _as_labels(y, "y", points.shape[0])
    target_points: np.ndarray | None = None
    target_labels: np.ndarray | None = None
    if target_x is not None:
        target_points = _as_features(target_x, "target_x", min_samples=1)
        if target_points.shape[1] != 2:
            raise ValueError(
                f"target_x: expected 2-D points of shape (M, 2), got {target_points.shape}"
            )
        if target_y is not None:
            target_labels = _as_labels(target_y, "target_y", target_points.shape[0])
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

    ax = _new_axes(ax)
    known = [predicted]
    if labels is not None:
        known.append(labels)
    if target_labels is not None:
        known.append(target_labels)
    classes = np.unique(np.concatenate([k.ravel() for k in known]))
    colours = _class_colours(classes)
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

    def point_colours(lab: np.ndarray | None, n: int) -> Any:
        if lab is None:
            return "0.4"
        return [colours[int(c)] for c in lab] if n else "0.4"

    ax.scatter(
        points[:, 0],
        points[:, 1],
        c=point_colours(labels, points.shape[0]),
        marker=_SOURCE_MARKER,
        s=14,
        edgecolors="k",
        linewidths=0.3,
        label="source",
    )
    if target_points is not None:
        ax.scatter(
            target_points[:, 0],
            target_points[:, 1],
            c=point_colours(target_labels, target_points.shape[0]),
            marker=_TARGET_MARKER,
            s=18,
            linewidths=1.0,
            label="target",
        )
        from matplotlib.lines import Line2D

        # neutral legend markers: the points themselves are coloured by class
        handles = [
            Line2D([], [], marker=m, color="0.3", linestyle="", label=name)
            for m, name in ((_SOURCE_MARKER, "source"), (_TARGET_MARKER, "target"))
        ]
        ax.legend(handles=handles, loc="best", fontsize="small")
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    if title is not None:
        ax.set_title(title)
    return ax


def save(
    figure: Figure | Axes, path: str | os.PathLike[str], *, dpi: int = 150, **kwargs: Any
) -> Path:
    """Write a figure to ``path`` atomically (a temporary file, then ``os.replace``).

    A reader never sees a half-written image, and an interrupted save leaves any older
    file at ``path`` intact. The format comes from the file suffix (``.png``, ``.pdf``,
    ``.svg``, ...). Missing parent folders are created.

    Args:
        figure: a matplotlib ``Figure``, or an ``Axes`` whose figure is saved.
        path: the destination file.
        dpi: resolution for raster formats.
        **kwargs: passed to ``Figure.savefig`` (``bbox_inches`` defaults to ``"tight"``).

    Returns:
        The destination as a `pathlib.Path`.

    Raises:
        TypeError: ``figure`` is neither a Figure nor an Axes.
        ValueError: the suffix is missing or not a format matplotlib can write.

    Examples:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> import tempfile, os
        >>> from transferkit import plot
        >>> ax = plot.curves({"val_accuracy": [0.5, 0.7, 0.8]})
        >>> folder = tempfile.mkdtemp()
        >>> plot.save(ax, os.path.join(folder, "curves.png")).stat().st_size > 0
        True
        >>> import matplotlib.pyplot as plt; plt.close(ax.figure)
    """
    _pyplot()
    from matplotlib.axes import Axes as AxesType
    from matplotlib.figure import Figure as FigureType

    if not isinstance(figure, (AxesType, FigureType)):
        raise TypeError(
            f"figure: expected a matplotlib Figure or Axes, got {type(figure).__name__}"
        )
    check_positive(dpi, "dpi", integer=True)
    owner = figure.figure if isinstance(figure, AxesType) else figure
    fig: FigureType = owner if isinstance(owner, FigureType) else owner.figure
    destination = Path(path)
    suffix = destination.suffix.lower().lstrip(".")
    supported = fig.canvas.get_supported_filetypes()
    if suffix not in supported:
        raise ValueError(
            f"path: expected a file suffix matplotlib can write ({', '.join(sorted(supported))}), "
            f"got {destination.name!r}"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("bbox_inches", "tight")
    with atomic_path(destination) as temporary:
        fig.savefig(temporary, format=suffix, dpi=dpi, **kwargs)
    logger.info("saved figure to %s", destination)
    return destination

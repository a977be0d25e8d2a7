"""Source vs target features in 2-D: one joint t-SNE or PCA of both domains."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._validation import check_option, check_positive, check_same_width
from ._common import (
    SOURCE_MARKER,
    TARGET_MARKER,
    ArrayLike,
    as_features,
    as_labels,
    class_colours,
    new_axes,
    subsample,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

logger = logging.getLogger(__name__)

EmbeddingMethod = Literal["tsne", "pca"]


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
    source = as_features(source_features, "source_features", min_samples=2)
    target = as_features(target_features, "target_features", min_samples=2)
    check_same_width(
        source, target, ("source_features", "target_features"), what="number of columns"
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
            source_labels = as_labels(labels[0], "labels[0]", source.shape[0])
        if labels[1] is not None:
            target_labels = as_labels(labels[1], "labels[1]", target.shape[0])
    ax = new_axes(ax)

    rng = np.random.default_rng(seed)
    keep_source = subsample(source.shape[0], max_points, rng)
    keep_target = subsample(target.shape[0], max_points, rng)
    stacked = np.concatenate([source[keep_source], target[keep_target]])
    points = _embed(stacked, method, perplexity=perplexity, seed=seed)
    source_points, target_points = points[: len(keep_source)], points[len(keep_source) :]

    def scatter(points: np.ndarray, marker: str, label: str, **colour: Any) -> None:
        ax.scatter(
            points[:, 0],
            points[:, 1],
            marker=marker,
            label=label,
            s=point_size,
            alpha=alpha,
            **colour,
        )

    domains = (
        ("source", source_points, source_labels, keep_source, SOURCE_MARKER, "C0"),
        ("target", target_points, target_labels, keep_target, TARGET_MARKER, "C1"),
    )
    if source_labels is None and target_labels is None:
        for domain, domain_points, _, _, marker, colour in domains:
            scatter(domain_points, marker, domain, c=colour)
    else:
        classes = np.unique(
            np.concatenate(
                [
                    source_labels[keep_source] if source_labels is not None else [],
                    target_labels[keep_target] if target_labels is not None else [],
                ]
            ).astype(np.int64)
        )
        colours = class_colours(classes)
        for domain, domain_points, domain_labels, keep, marker, _ in domains:
            if domain_labels is None:  # e.g. an unlabelled target: grey
                scatter(domain_points, marker, domain, c="0.6")
                continue
            kept = domain_labels[keep]
            for cls in np.unique(kept):
                scatter(
                    domain_points[kept == cls],
                    marker,
                    f"{domain} {int(cls)}",
                    color=colours[int(cls)],
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

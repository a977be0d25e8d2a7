"""embedding: source vs target features in 2-D by a joint t-SNE or PCA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import transferkit as tk  # noqa: E402
from tests.plot.figures import assert_readable_png, scatter_sets  # noqa: E402
from transferkit import plot  # noqa: E402


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_draws_one_scatter_per_domain_and_saves_a_png(
    method: str, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(60, 5, generator=gen)
    target = torch.randn(40, 5, generator=gen) + 3.0
    ax = plot.embedding(source, target, method=method)  # type: ignore[arg-type]
    sets = scatter_sets(ax)
    assert [s.get_label() for s in sets] == ["source", "target"]
    assert [len(s.get_offsets()) for s in sets] == [60, 40]
    assert ax.get_legend() is not None
    path = plot.save(ax.figure, tmp_path / f"embedding_{method}.png")
    assert_readable_png(path)


def test_pca_embedding_matches_a_numpy_svd_reference() -> None:
    rng = np.random.default_rng(1)
    source = rng.normal(size=(30, 4)) * [5.0, 2.0, 0.5, 0.1]
    target = rng.normal(size=(20, 4)) * [5.0, 2.0, 0.5, 0.1] + 1.0
    ax = plot.embedding(source, target, method="pca")
    drawn = np.concatenate([s.get_offsets() for s in scatter_sets(ax)])
    stacked = np.concatenate([source, target])
    centred = stacked - stacked.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    # principal axes are defined up to sign
    np.testing.assert_allclose(np.abs(drawn), np.abs(expected), rtol=1e-6, atol=1e-8)


def test_embedding_separates_shifted_domains_and_overlaps_identical_ones() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(80, 10))

    def centre_distance(target: np.ndarray) -> float:
        ax = plot.embedding(base, target, method="pca")
        s, t = (np.asarray(c.get_offsets()) for c in scatter_sets(ax))
        spread = np.concatenate([s, t]).std()
        return float(np.linalg.norm(s.mean(0) - t.mean(0)) / spread)

    assert centre_distance(base + 4.0) > 1.0
    assert centre_distance(rng.normal(size=(80, 10))) < 0.5


def test_embedding_colours_by_class_and_accepts_an_unlabelled_target() -> None:
    task = tk.datasets.moons(30, n_samples=100, seed=0)
    ax = plot.embedding(task.source_x, task.target_x, method="pca", labels=(task.source_y, None))
    labels = [s.get_label() for s in scatter_sets(ax)]
    assert labels == ["source 0", "source 1", "target"]
    ax = plot.embedding(
        task.source_x, task.target_x, method="pca", labels=(task.source_y, task.target_y)
    )
    assert [s.get_label() for s in scatter_sets(ax)] == [
        "source 0",
        "source 1",
        "target 0",
        "target 1",
    ]
    total = sum(len(s.get_offsets()) for s in scatter_sets(ax))
    assert total == len(task.source_x) + len(task.target_x)


def test_embedding_subsamples_to_max_points_deterministically() -> None:
    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(200, 6)), rng.normal(size=(40, 6))
    a = plot.embedding(source, target, method="tsne", max_points=30, seed=3)
    b = plot.embedding(source, target, method="tsne", max_points=30, seed=3)
    assert [len(s.get_offsets()) for s in scatter_sets(a)] == [30, 30]
    for first, second in zip(scatter_sets(a), scatter_sets(b), strict=True):
        np.testing.assert_array_equal(first.get_offsets(), second.get_offsets())


def test_embedding_draws_into_a_given_axes_and_leaves_inputs_alone() -> None:
    _, (left, right) = plt.subplots(1, 2)
    source = torch.randn(10, 3)
    before = source.clone()
    returned = plot.embedding(source, torch.randn(10, 3), method="pca", ax=right)
    assert returned is right and not left.collections
    assert torch.equal(source, before)


@pytest.mark.parametrize(
    ("source", "target", "kwargs", "error", "match"),
    [
        (torch.randn(10, 3), torch.randn(10, 4), {}, ValueError, "same number of columns"),
        (torch.randn(10, 1), torch.randn(10, 1), {}, ValueError, "at least 2 feature"),
        (torch.randn(1, 3), torch.randn(10, 3), {}, ValueError, "at least 2 samples"),
        (torch.randn(10), torch.randn(10, 3), {}, ValueError, "2-D"),
        (torch.full((4, 3), float("nan")), torch.randn(4, 3), {}, ValueError, "finite"),
        ([[0.0, 1.0]], torch.randn(4, 2), {}, TypeError, "source_features"),
        (torch.randn(5, 3), torch.randn(5, 3), {"method": "tsen"}, ValueError, "did you mean"),
        (torch.randn(5, 3), torch.randn(5, 3), {"max_points": 1}, ValueError, "max_points"),
        (torch.randn(5, 3), torch.randn(5, 3), {"labels": [0, 1]}, TypeError, "pair"),
        (
            torch.randn(5, 3),
            torch.randn(5, 3),
            {"labels": (torch.zeros(4, dtype=torch.long), None)},
            ValueError,
            "5 labels",
        ),
        (
            torch.randn(5, 3),
            torch.randn(5, 3),
            {"labels": (torch.zeros(5), None)},
            TypeError,
            "integer",
        ),
        (torch.randn(5, 3), torch.randn(5, 3), {"ax": "left"}, TypeError, "Axes"),
    ],
)
def test_embedding_rejects_bad_input(
    source: object,
    target: object,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        plot.embedding(source, target, **kwargs)  # type: ignore[arg-type]

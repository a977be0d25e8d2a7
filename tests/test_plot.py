from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import transferkit as tk  # noqa: E402
from transferkit import plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures_and_forbid_show(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def no_show(*args: object, **kwargs: object) -> None:
        raise AssertionError("transferkit.plot must never call plt.show()")

    monkeypatch.setattr(plt, "show", no_show)
    yield
    plt.close("all")


def scatter_sets(ax: object) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection)]  # type: ignore[attr-defined]


def assert_readable_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert float(image[..., :3].std()) > 0  # not a blank canvas


# --------------------------------------------------------------------------- embedding


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


# --------------------------------------------------------------------------- curves


def test_curves_draw_one_line_per_series_with_its_values(tmp_path: Path) -> None:
    history = {"train_loss": [1.0, 0.7, 0.5, 0.4], "val_loss": [1.1, 0.9, float("nan"), 0.8]}
    ax = plot.curves(history)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["train_loss", "val_loss"]
    for line, values in zip(lines, history.values(), strict=True):
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 5))
        np.testing.assert_array_equal(line.get_ydata(), values)
    assert len(ax.figure.axes) == 1
    assert_readable_png(plot.save(ax, tmp_path / "curves.png"))


def test_curves_put_metrics_on_a_second_axis_next_to_losses() -> None:
    history = {"loss": [2.3, 1.0, 0.5], "accuracy": [0.1, 0.6, 0.9], "val_accuracy": [0.2, 0.5]}
    ax = plot.curves(history)
    right = ax.figure.axes[-1]
    assert right is not ax
    assert [line.get_label() for line in ax.get_lines()] == ["loss"]
    assert [line.get_label() for line in right.get_lines()] == ["accuracy", "val_accuracy"]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["loss", "accuracy", "val_accuracy"]
    single = plot.curves(history, split=False)
    assert len(single.get_lines()) == 3 and len(single.figure.axes) == 1


@pytest.mark.parametrize(
    ("history", "error", "match"),
    [
        ({}, ValueError, "at least one series"),
        ([1.0, 2.0], TypeError, "mapping"),
        ({"loss": []}, ValueError, "non-empty"),
        ({"loss": [1.0, float("inf")]}, ValueError, "inf"),
        ({"loss": [float("nan")]}, ValueError, "nan"),
        ({"loss": "0.5"}, TypeError, "sequence"),
        ({"loss": [[1.0], [2.0]]}, ValueError, "1-D"),
        ({"loss": ["a", "b"]}, TypeError, "numbers"),
        ({1: [1.0]}, TypeError, "string keys"),
    ],
)
def test_curves_reject_bad_history(history: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        plot.curves(history)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decision boundary


def threshold_model() -> nn.Linear:
    """Logits [0, 10 * x0]: class 1 exactly where x0 > 0."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
        model.bias.zero_()
    return model


def class_one_region_left_edge(ax: object) -> float:
    contour = next(c for c in ax.collections if isinstance(c, ContourSet))  # type: ignore[attr-defined]
    paths = contour.get_paths()
    return float(min(p.vertices[:, 0].min() for p in paths[1:] if len(p.vertices)))


def test_decision_boundary_regions_follow_the_model(tmp_path: Path) -> None:
    x = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-0.5, 0.5], [0.5, -0.5]])
    y = torch.tensor([0, 1, 0, 1])
    resolution = 101
    ax = plot.decision_boundary(threshold_model(), x, y, resolution=resolution, margin=0.0)
    step = 2.0 / (resolution - 1)
    assert abs(class_one_region_left_edge(ax)) <= step
    points = scatter_sets(ax)
    assert len(points) == 1
    np.testing.assert_allclose(points[0].get_offsets(), x.numpy())
    assert ax.get_xlim() == pytest.approx((-1.0, 1.0))
    assert_readable_png(plot.save(ax, tmp_path / "boundary.png"))


def test_decision_boundary_accepts_estimators_callables_and_one_logit_models() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    y = (x[:, 0] > 0).astype(np.int64)
    estimator = LogisticRegression().fit(x, y)
    one_logit = nn.Linear(2, 1)
    with torch.no_grad():
        one_logit.weight.copy_(torch.tensor([[1.0, 0.0]]))
        one_logit.bias.zero_()
    for model in (estimator, one_logit, lambda t: torch.stack([-t[:, 0], t[:, 0]], 1)):
        ax = plot.decision_boundary(model, x, y, resolution=81, margin=0.0)
        step = float(x[:, 0].max() - x[:, 0].min()) / 80
        assert abs(class_one_region_left_edge(ax)) < 3 * step


def test_decision_boundary_restores_train_mode_and_keeps_weights() -> None:
    model = tk.models.MLP(2, 3, hidden=(8,))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plot.decision_boundary(model, torch.randn(20, 2), resolution=20)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_decision_boundary_draws_target_points_with_their_own_marker() -> None:
    task = tk.datasets.moons(40, n_samples=80, seed=1)
    ax = plot.decision_boundary(
        threshold_model(),
        task.source_x,
        task.source_y,
        target_x=task.target_x,
        target_y=task.target_y,
        resolution=30,
    )
    sets = scatter_sets(ax)
    assert [s.get_label() for s in sets] == ["source", "target"]
    assert len(sets[1].get_offsets()) == len(task.target_x)
    every = torch.cat([task.source_x, task.target_x])
    low, high = ax.get_xlim()
    assert low <= float(every[:, 0].min()) and high >= float(every[:, 0].max())


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (torch.randn(5, 3), {}, ValueError, r"\(N, 2\)"),
        (torch.randn(5, 2), {"y": torch.zeros(4, dtype=torch.long)}, ValueError, "5 labels"),
        (torch.randn(5, 2), {"resolution": 1}, ValueError, "resolution"),
        (torch.randn(5, 2), {"margin": -1.0}, ValueError, "margin"),
        (torch.randn(5, 2), {"target_x": torch.randn(3, 4)}, ValueError, "target_x"),
        (torch.randn(5, 2), {"target_y": torch.zeros(3, dtype=torch.long)}, ValueError, "without"),
        (torch.tensor([[0.0, float("nan")]]), {}, ValueError, "finite"),
    ],
)
def test_decision_boundary_rejects_bad_input(
    x: torch.Tensor, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        plot.decision_boundary(threshold_model(), x, **kwargs)  # type: ignore[arg-type]


def test_decision_boundary_rejects_models_it_cannot_call_or_with_bad_outputs() -> None:
    with pytest.raises(TypeError, match="model"):
        plot.decision_boundary(object(), torch.randn(5, 2))
    with pytest.raises(ValueError, match="logits of shape"):
        plot.decision_boundary(lambda t: t[:3], torch.randn(5, 2), resolution=5)


@pytest.mark.slow
def test_decision_boundary_of_a_moons_classifier_end_to_end(tmp_path: Path) -> None:
    tk.seed_everything(0)
    task = tk.datasets.moons(0, n_samples=200, seed=0)
    model = tk.models.MLP(2, 2, hidden=(32, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(task.source_x), task.source_y).backward()
        optimizer.step()
    ax = plot.decision_boundary(model, task.source_x, task.source_y, resolution=120)
    # the plotted model really learned the task, and its picture is written
    assert (model(task.source_x).argmax(1) == task.source_y).float().mean() > 0.95
    assert_readable_png(plot.save(ax, tmp_path / "moons.png"))


# --------------------------------------------------------------------------- save and import


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "figure.png"
    ax = plot.curves({"accuracy": [0.1, 0.5]})
    assert plot.save(ax, path) == path
    first = path.read_bytes()
    ax.plot([1, 2], [0.9, 0.2])
    plot.save(ax.figure, path)
    assert path.read_bytes() != first
    assert sorted(p.name for p in path.parent.iterdir()) == ["figure.png"]


def test_failed_save_keeps_the_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "figure.png"
    ax = plot.curves({"accuracy": [0.1, 0.5]})
    plot.save(ax, path)
    old = path.read_bytes()

    def broken_savefig(*args: object, **kwargs: object) -> None:
        Path(str(args[0])).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ax.figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot.save(ax, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_save_writes_other_formats_and_rejects_unknown_ones(tmp_path: Path) -> None:
    ax = plot.curves({"loss": [1.0, 0.5]})
    assert plot.save(ax, tmp_path / "f.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="suffix"):
        plot.save(ax, tmp_path / "f.docx")
    with pytest.raises(ValueError, match="suffix"):
        plot.save(ax, tmp_path / "no_suffix")
    with pytest.raises(TypeError, match="Figure or Axes"):
        plot.save("figure", tmp_path / "f.png")  # type: ignore[arg-type]


def test_missing_matplotlib_names_the_plot_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"transferkit\[plot\]"):
        plot.curves({"loss": [1.0]})

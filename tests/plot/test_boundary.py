"""decision_boundary: class regions of a 2-D classifier with the points on top."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
from sklearn.linear_model import LogisticRegression  # noqa: E402

import transferkit as tk  # noqa: E402
from tests.plot.figures import (  # noqa: E402
    assert_readable_png,
    class_one_region_left_edge,
    scatter_sets,
    threshold_model,
)
from transferkit import plot  # noqa: E402


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

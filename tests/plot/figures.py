"""Checks shared by the plot tests: what was drawn, and whether a PNG file is a real image."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import torch
from matplotlib.collections import PathCollection
from matplotlib.contour import ContourSet
from torch import nn

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scatter_sets(ax: object) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection)]  # type: ignore[attr-defined]


def assert_readable_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert float(image[..., :3].std()) > 0  # not a blank canvas


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

"""What every picture shares: the lazy matplotlib import, the Axes, inputs, colours, markers."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .._validation import check_features, check_labels

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ArrayLike = Tensor | np.ndarray

SOURCE_MARKER = "o"
TARGET_MARKER = "x"


def pyplot() -> ModuleType:
    """Import ``matplotlib.pyplot`` or explain how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "transferkit.plot needs matplotlib, which is not installed; install the "
            "'plot' extra: pip install 'transferkit[plot]'"
        ) from error
    return plt


def new_axes(ax: Axes | None) -> Axes:
    if ax is not None:
        from matplotlib.axes import Axes as AxesType

        if not isinstance(ax, AxesType):
            raise TypeError(f"ax: expected a matplotlib Axes or None, got {type(ax).__name__}")
        return ax
    _, new_ax = pyplot().subplots(figsize=(6.0, 5.0))
    return new_ax  # type: ignore[no-any-return]


def as_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        array = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)
        return torch.from_numpy(np.ascontiguousarray(array))
    if isinstance(x, Tensor):
        return x.detach()
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def as_features(x: object, name: str, *, min_samples: int) -> np.ndarray:
    tensor = check_features(as_tensor(x, name), name, min_samples=min_samples)
    return tensor.cpu().to(torch.float64).numpy()


def as_labels(y: object, name: str, num_samples: int) -> np.ndarray:
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.asarray(y))
    elif isinstance(y, (list, tuple)):
        y = torch.as_tensor(y)
    labels = check_labels(y, name, num_samples=num_samples)
    return labels.cpu().numpy().astype(np.int64)


def subsample(n: int, max_points: int, rng: np.random.Generator) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def class_colours(classes: np.ndarray) -> dict[int, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    size = 10 if len(classes) <= 10 else 20
    return {int(c): cmap(i % size) for i, c in enumerate(classes)}

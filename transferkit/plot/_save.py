"""Writing a figure to disk atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import atomic_path
from .._validation import check_positive
from ._common import pyplot

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


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
    pyplot()
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

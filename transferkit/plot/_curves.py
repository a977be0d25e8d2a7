"""Training curves: one line per series of a ``history`` dict, losses and metrics apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._validation import check_bool
from ._common import new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes


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
    ax = new_axes(ax)
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

"""curves: one line per history series, losses and metrics on their own axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from tests.plot.figures import assert_readable_png  # noqa: E402
from transferkit import plot  # noqa: E402


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

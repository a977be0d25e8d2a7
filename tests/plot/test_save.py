"""save: atomic figure files; and what a missing matplotlib says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from transferkit import plot  # noqa: E402


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

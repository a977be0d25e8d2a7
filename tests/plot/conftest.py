"""Every plot test runs headless, closes its figures and fails if anything calls show()."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def close_figures_and_forbid_show(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def no_show(*args: object, **kwargs: object) -> None:
        raise AssertionError("transferkit.plot must never call plt.show()")

    monkeypatch.setattr(plt, "show", no_show)
    yield
    plt.close("all")

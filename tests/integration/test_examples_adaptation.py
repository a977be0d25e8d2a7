from __future__ import annotations

from pathlib import Path

import pytest

from ._examples import run_example


@pytest.mark.slow
def test_dann_moons_smoke_beats_source_only_and_saves_plot(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "moons.png"
    result = run_example("examples/dann_moons.py", "--smoke", "--out", str(out))
    assert "DANN" in result.stdout and "source-only" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_domain_adaptation_digits_smoke_beats_source_only() -> None:
    result = run_example("examples/domain_adaptation_digits.py", "--smoke")
    assert "| dann |" in result.stdout

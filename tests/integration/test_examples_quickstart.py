from __future__ import annotations

from pathlib import Path

import pytest

from ._examples import run_example


@pytest.mark.slow
def test_quickstart_smoke_beats_source_only_and_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "quickstart.png"
    done = run_example(
        "examples/quickstart.py", "--smoke", "--out", str(out), env={"OMP_NUM_THREADS": "1"}
    )
    assert "source-only" in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

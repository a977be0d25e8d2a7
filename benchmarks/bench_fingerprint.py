"""What the feature cache's full fingerprints cost.

Two measurements:

1. Hashing throughput (GB/s) of the cache's tree hash (``hashlib.blake2b`` over
   memoryviews, 4 MiB leaves hashed in parallel threads) on a 256 MiB float32 tensor:
   contiguous (no copy), as ``channels_last`` images and as a transposed 2-D view (both
   non-contiguous: hashed in logical order through 16 MiB contiguous pieces, so the
   digest equals the contiguous one), and the tree hash forced to one thread; the floor is
   one ``hashlib.blake2b(buffer)`` call. Reported per CPU-second (``time.process_time``,
   all threads) and per wall second; target >= 1 GB/s.
2. Overhead for N = 100k samples (SmallCNN on 1x16x16 inputs, batch 256, model output of
   128 floats): ``extract_features(model, x)`` without a cache against ``cache=<new
   folder>`` (fingerprint of the model, digest of every input batch, checksum of every
   stored chunk, the writes and the final fsync) and against reusing the complete cache
   (every input batch hashed and every stored chunk verified, no forward pass). The pure
   hashing part (model fingerprint + input digests + chunk checksums, done standalone) is
   reported as a fraction of the extraction without a cache; target <= 5%.

Contenders alternate within each repeat (one process, one torch thread), each repeat on
fresh data (seed = repeat); medians over repeats, with the standard deviation. Times are
CPU times of the process (the cores here are shared with other jobs), wall times are
reported alongside.

Run ``python benchmarks/bench_fingerprint.py`` (``--quick``: N = 10k, 2 repeats).
Results go to ``benchmarks/results/bench_fingerprint.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import transferkit as tk
from transferkit.features import _fingerprint as _feature_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common
from _common import RESULTS, environment, load_average, write_results


def timed(fn: Any) -> tuple[float, float]:
    """(CPU seconds of the whole process, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def measure_hashing(repeats: int, mib: int) -> dict[str, Any]:
    tensor = torch.randn(mib << 18)  # float32: 4 bytes per element
    square = tensor.view(mib << 8, 1024)
    transposed = square.t()  # same bytes, non-contiguous
    images = tensor.view(-1, 4, 64, 64).contiguous(memory_format=torch.channels_last)
    nbytes = tensor.numel() * 4

    def tree(t: torch.Tensor) -> None:
        h = _feature_cache._TreeHash()
        _feature_cache._update_tensor(h, t)
        h.hexdigest()

    def one_thread() -> None:
        saved = _feature_cache._hash_pool
        _feature_cache._hash_pool = lambda: None  # type: ignore[assignment]
        try:
            tree(tensor)
        finally:
            _feature_cache._hash_pool = saved  # type: ignore[assignment]

    contenders = {
        "tree hash, contiguous": lambda: tree(tensor),
        "tree hash, channels_last images (N, 4, 64, 64)": lambda: tree(images),
        "tree hash, transposed 2-D view": lambda: tree(transposed),
        "tree hash, one thread": one_thread,
        "hashlib.blake2b one call (floor)": lambda: hashlib.blake2b(
            tensor.numpy(), digest_size=16
        ).hexdigest(),
    }
    samples: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            cpu, wall = timed(fn)
            samples[name]["cpu"].append(nbytes / cpu / 1e9)
            samples[name]["wall"].append(nbytes / wall / 1e9)
    return {
        "bytes": nbytes,
        "gb_per_s": {
            name: {"cpu": summary(s["cpu"]), "wall": summary(s["wall"])}
            for name, s in samples.items()
        },
    }


def pure_hashing(model: torch.nn.Module, x: torch.Tensor, out: np.ndarray, batch: int) -> None:
    """What a cached extraction hashes: model, every input batch, every stored chunk."""
    _feature_cache._model_fingerprint(model)
    for start in range(0, len(x), batch):
        _feature_cache._batch_digest(x[start : start + batch])
        h = _feature_cache._TreeHash()
        h.update(np.ascontiguousarray(out[start : start + batch]).reshape(-1).view(np.uint8))
        h.hexdigest()


def measure_overhead(n: int, repeats: int, batch: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = tk.models.SmallCNN(num_classes=10).eval()
    names = ["no cache", "cache, first run", "cache, reuse (verify all)", "hashing only"]
    cpu: dict[str, list[float]] = {k: [] for k in names}
    wall: dict[str, list[float]] = {k: [] for k in names}
    for seed in range(repeats):
        x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        folder = Path(tempfile.mkdtemp(prefix="bench-fingerprint-"))
        try:
            result: dict[str, Any] = {}

            def plain(x: torch.Tensor = x, result: dict[str, Any] = result) -> None:
                result["out"] = tk.extract_features(model, x, batch_size=batch, progress=False)

            def cached(x: torch.Tensor = x, folder: Path = folder) -> None:
                tk.extract_features(model, x, batch_size=batch, cache=folder, progress=False)

            def hashing(x: torch.Tensor = x, result: dict[str, Any] = result) -> None:
                pure_hashing(model, x, result["out"], batch)

            runs = {  # the second cached call finds the complete cache of the first
                "no cache": plain,
                "cache, first run": cached,
                "cache, reuse (verify all)": cached,
                "hashing only": hashing,
            }
            for name, fn in runs.items():
                c, w = timed(fn)
                cpu[name].append(c)
                wall[name].append(w)
        finally:
            shutil.rmtree(folder)
    base_cpu, base_wall = cpu["no cache"], wall["no cache"]
    return {
        "n": n,
        "batch_size": batch,
        "input_bytes": n * 256 * 4,
        "output_bytes": n * 128 * 4,
        "cpu_s": {k: summary(v) for k, v in cpu.items()},
        "wall_s": {k: summary(v) for k, v in wall.items()},
        "ratio_to_no_cache_cpu": {
            k: summary([a / b for a, b in zip(v, base_cpu, strict=True)]) for k, v in cpu.items()
        },
        "ratio_to_no_cache_wall": {
            k: summary([a / b for a, b in zip(v, base_wall, strict=True)]) for k, v in wall.items()
        },
    }


def markdown(result: dict[str, Any]) -> str:
    hashing, overhead = result["hashing"], result["overhead"]
    lines = [
        "# Feature-cache fingerprint cost",
        "",
        f"{result['machine']}; load average before/after: {result['load_before']} / "
        f"{result['load_after']}; medians over {result['repeats']} repeats (± std).",
        "",
        f"## Hashing throughput ({hashing['bytes'] / 2**20:.0f} MiB float32)",
        "",
        "| contender | GB per CPU-second | GB per wall second |",
        "|---|---:|---:|",
    ]
    for name, value in hashing["gb_per_s"].items():
        c, w = value["cpu"], value["wall"]
        lines.append(
            f"| {name} | {c['median']:.2f} ± {c['std']:.2f} | {w['median']:.2f} ± {w['std']:.2f} |"
        )
    n = overhead["n"]
    lines += [
        "",
        f"## Overhead at N = {n:,} (SmallCNN, 1x16x16 inputs, batch {overhead['batch_size']})",
        "",
        "| run | CPU s | ratio to no cache (CPU) | wall s | ratio (wall) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, value in overhead["cpu_s"].items():
        rc = overhead["ratio_to_no_cache_cpu"][name]
        ws = overhead["wall_s"][name]
        rw = overhead["ratio_to_no_cache_wall"][name]
        lines.append(
            f"| {name} | {value['median']:.2f} ± {value['std']:.2f} | "
            f"{rc['median']:.3f} ± {rc['std']:.3f} | {ws['median']:.2f} ± {ws['std']:.2f} | "
            f"{rw['median']:.3f} ± {rw['std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 10k, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 5)
    load_before = load_average()
    env = environment()
    result: dict[str, Any] = {
        "machine": f"{env['processor']}, {env['cpu_count']} cores, torch {env['torch']}, "
        f"Python {env['python']}, 1 torch thread",
        "environment": env,
        "repeats": repeats,
        "hashing": measure_hashing(repeats, 64 if args.quick else 256),
        "overhead": measure_overhead(10_000 if args.quick else 100_000, repeats, 256),
    }
    result["load_before"] = load_before
    result["load_after"] = load_average()
    suffix = "_quick" if args.quick else ""
    table = markdown(result)
    write_results(RESULTS / f"bench_fingerprint{suffix}.json", result, table)
    print(table)


if __name__ == "__main__":
    main()

"""Benchmark: forward+backward of 5-kernel Gaussian MMD against its floor and a broadcast peer.

For each batch size ``B`` per domain and feature dimension ``D`` it times, interleaved in
one process (so machine load affects all three alike):

- ``ours``: ``tk.losses.mmd(source, target)`` (5 bandwidths, unbiased) forward+backward;
- ``floor``: the bare Gram GEMM ``(f @ f.T).sum()`` forward+backward on the pooled
  ``f = cat([source, target])``: no MMD can need less than one ``(2B)^2 D`` GEMM;
- ``broadcast``: a TLlib-style MK-MMD that forms the ``(2B, 2B, D)`` difference tensor
  (written below, as TLlib's ``GaussianKernel`` does it). Skipped where that tensor times
  three (difference, square, gradient) would need more than ``--broadcast-limit-gb``.

Peak memory of one forward+backward is measured in a fresh subprocess per case: on CUDA
with ``torch.cuda.max_memory_allocated``, on the CPU as the increase of the process's
resident-set high-water mark (``ru_maxrss``) over the resident size before the call.

Usage: ``python benchmarks/bench_losses.py [--quick] [--device auto] [--large] [--threads N]``.
On a CPU shared with other jobs, ``--threads 1`` gives steadier numbers: with more
threads than free cores every small parallel op waits at a barrier for a descheduled
thread, which penalises elementwise-heavy code far more than one big GEMM.
Writes ``benchmarks/results/bench_losses.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import transferkit as tk

RESULTS = Path(__file__).resolve().parent / "results"
MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def broadcast_mmd(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TLlib-style multi-kernel MMD (unbiased): (N, N, D) broadcast distances."""
    batch = source.shape[0]
    features = torch.cat([source, target])
    l2 = ((features.unsqueeze(0) - features.unsqueeze(1)) ** 2).sum(2)
    sigma2 = l2.detach().mean()
    kernels = sum(torch.exp(-l2 / (2 * m * sigma2)) for m in MULTIPLIERS)
    assert isinstance(kernels, torch.Tensor)
    n = 2 * batch
    index = torch.zeros(n, n, device=source.device)
    index[:batch, :batch] = 1.0 / (batch * (batch - 1))
    index[batch:, batch:] = 1.0 / (batch * (batch - 1))
    index[:batch, batch:] = -1.0 / (batch * batch)
    index[batch:, :batch] = -1.0 / (batch * batch)
    index.fill_diagonal_(0.0)
    return (kernels * index).sum()


def make_step(name: str, batch: int, dim: int, device: torch.device) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(batch * 10_000 + dim)
    source = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
    target = (torch.randn(batch, dim, generator=generator) + 0.5).to(device).requires_grad_()
    pooled = torch.cat([source, target]).detach().requires_grad_()

    def ours() -> None:
        tk.losses.mmd(source, target).backward()

    def floor() -> None:
        (pooled @ pooled.T).sum().backward()

    def broadcast() -> None:
        broadcast_mmd(source, target).backward()

    return {"ours": ours, "floor": floor, "broadcast": broadcast}[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, Callable[[], None]], repeats: dict[str, int], device: torch.device
) -> dict[str, float]:
    """Median seconds per call; the implementations take turns within every round."""
    for step in steps.values():
        step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(max(repeats.values())):
        for name, step in steps.items():
            if round_index >= repeats[name]:
                continue
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_child(name: str, batch: int, dim: int, device_name: str) -> None:
    """Subprocess entry: one forward+backward, print the peak extra memory in bytes."""
    device = torch.device(device_name)
    step = make_step(name, batch, dim, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(device)
        print(torch.cuda.max_memory_allocated() - before)
        return
    reset_peak_rss()
    before = current_rss_bytes()
    step()
    print(max(0, peak_rss_bytes() - before))


def peak_memory(name: str, batch: int, dim: int, device: torch.device) -> int | None:
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            name,
            str(batch),
            str(dim),
            str(device),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        print(f"  peak memory of {name} failed: {result.stderr.strip()[-300:]}", flush=True)
        return None
    return int(result.stdout.strip().splitlines()[-1])


def large_case(device: torch.device, batch: int, dim: int) -> dict[str, object]:
    """One fwd+bwd at a large batch (the chunked path) in a subprocess: time and memory."""
    code = (
        "import time, torch, transferkit as tk, resource, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from bench_losses import current_rss_bytes, peak_rss_bytes, reset_peak_rss\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"d = torch.device({str(device)!r})\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"s = torch.randn({batch}, {dim}, generator=g).to(d).requires_grad_()\n"
        f"t = (torch.randn({batch}, {dim}, generator=g) + 0.5).to(d).requires_grad_()\n"
        "reset_peak_rss(); before = current_rss_bytes()\n"
        "start = time.perf_counter()\n"
        "loss = tk.losses.mmd(s, t); loss.backward()\n"
        "if d.type == 'cuda': torch.cuda.synchronize()\n"
        "elapsed = time.perf_counter() - start\n"
        "peak = peak_rss_bytes() - before\n"
        "if d.type == 'cuda': peak = torch.cuda.max_memory_allocated()\n"
        "print(elapsed, peak, float(loss), bool(torch.isfinite(s.grad).all()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return {"batch": batch, "dim": dim, "error": result.stderr.strip()[-500:]}
    elapsed, peak, loss, finite = result.stdout.split()
    full = (2 * batch) ** 2 * 4
    return {
        "batch": batch,
        "dim": dim,
        "seconds": float(elapsed),
        "peak_bytes": int(peak),
        "full_kernel_matrix_bytes": full,
        "peak_over_full_matrix": int(peak) / full,
        "loss": float(loss),
        "finite_gradient": finite == "True",
    }


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    parser.add_argument("--broadcast-limit-gb", type=float, default=7.0)
    parser.add_argument(
        "--large", action="store_true", help="also run B=8192, D=2048 once (chunked path)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, batch, dim, device_name = args.child
        peak_memory_child(name, int(batch), int(dim), device_name)
        return

    device = tk.resolve_device(args.device)
    sizes = (
        [(64, 256), (256, 256)]
        if args.quick
        else [(b, d) for d in (256, 2048) for b in (64, 256, 1024)]
    )
    repeats = args.repeats or (3 if args.quick else 7)
    rows: list[dict[str, object]] = []
    for batch, dim in sizes:
        n = 2 * batch
        broadcast_bytes = 3 * n * n * dim * 4
        names = ["floor", "ours"]
        if broadcast_bytes <= args.broadcast_limit_gb * 1e9:
            names.append("broadcast")
        steps = {name: make_step(name, batch, dim, device) for name in names}
        reps = {name: repeats if name != "broadcast" else max(1, min(repeats, 3)) for name in names}
        medians = time_interleaved(steps, reps, device)
        memory = {
            name: (None if args.no_memory else peak_memory(name, batch, dim, device))
            for name in names
        }
        row: dict[str, object] = {
            "batch": batch,
            "dim": dim,
            "seconds": medians,
            "repeats": reps,
            "peak_bytes": memory,
            "ours_over_floor": medians["ours"] / medians["floor"],
            "broadcast_over_ours": (
                medians["broadcast"] / medians["ours"] if "broadcast" in medians else None
            ),
            "broadcast_skipped": (
                None
                if "broadcast" in medians
                else f"needs ~{broadcast_bytes / 1e9:.1f} GB > {args.broadcast_limit_gb} GB"
            ),
        }
        rows.append(row)
        print(
            f"B={batch:5d} D={dim:5d}  floor {medians['floor'] * 1e3:9.1f} ms  "
            f"ours {medians['ours'] * 1e3:9.1f} ms ({row['ours_over_floor']:.2f}x floor)  "
            + (
                f"broadcast {medians['broadcast'] * 1e3:9.1f} ms "
                f"({row['broadcast_over_ours']:.0f}x ours)"
                if "broadcast" in medians
                else f"broadcast skipped ({row['broadcast_skipped']})"
            ),
            flush=True,
        )
    large = large_case(device, 8192, 2048) if args.large else None
    if large is not None:
        print(f"large: {large}", flush=True)

    meta = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "quick": args.quick,
        "memory_method": (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "ru_maxrss increase over the RSS before the call, fresh subprocess"
        ),
    }
    report = {"meta": meta, "rows": rows, "large": large}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "bench_losses.json", json.dumps(report, indent=2))
    write_atomic(RESULTS / "bench_losses.md", markdown(report))
    print(markdown(report))


def markdown(report: dict[str, object]) -> str:
    meta = report["meta"]
    assert isinstance(meta, dict)
    lines = [
        f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"{meta['threads']} threads, load average at the end {meta['load_average']}",
        "",
        "| B | D | floor ms | ours ms | ours/floor | broadcast ms | broadcast/ours "
        "| peak MiB floor | ours | broadcast |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = report["rows"]
    assert isinstance(rows, list)
    for row in rows:
        sec, mem = row["seconds"], row["peak_bytes"]
        bro = f"{sec['broadcast'] * 1e3:.1f}" if "broadcast" in sec else "skipped"
        ratio = "-" if row["broadcast_over_ours"] is None else f"{row['broadcast_over_ours']:.0f}x"
        lines.append(
            f"| {row['batch']} | {row['dim']} | {sec['floor'] * 1e3:.1f} | "
            f"{sec['ours'] * 1e3:.1f} | {row['ours_over_floor']:.2f} | {bro} | {ratio} | "
            f"{mib(mem.get('floor'))} | {mib(mem.get('ours'))} | {mib(mem.get('broadcast'))} |"
        )
    large = report.get("large")
    if isinstance(large, dict) and "seconds" in large:
        lines += [
            "",
            f"B={large['batch']} per domain, D={large['dim']} (chunked path): one fwd+bwd "
            f"{large['seconds']:.1f} s, peak {mib(large['peak_bytes'])} MiB = "
            f"{large['peak_over_full_matrix']:.2f} x one (2B)^2 fp32 matrix, "
            f"finite gradient: {large['finite_gradient']}",
        ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


if __name__ == "__main__":
    main()

"""Benchmark: forward+backward of 5-kernel Gaussian MMD and JMMD against their GEMM floors.

For each batch size ``B`` per domain and feature dimension ``D`` it times, interleaved in
one process (the contenders take turns within every round, so machine load affects them
alike), one torch thread, medians over the rounds:

- ``ours``/``ours_biased``: ``tk.losses.mmd(source, target)`` (default ``GaussianKernel``,
  5 bandwidths, mean heuristic), unbiased / biased, forward+backward;
- ``floor``: the bare Gram GEMM ``(f @ f.T).sum()`` forward+backward on the pooled
  ``f = cat([source, target])``: one ``(2B x D) @ (D x 2B)`` GEMM forward and the two
  GEMMs of its backward. Any MMD that forms the pooled Gram matrix in a GEMM and returns
  a gradient does this much work (ours exploits symmetry and fuses the gradient
  reduction, so it can go below it);
- ``broadcast``: a TLlib-style MK-MMD that forms the ``(2B, 2B, D)`` difference tensor
  (skipped where three such tensors would need more than ``--broadcast-limit-gb``);
- ``skada``/``skada_5``: skada's ``dan_loss`` (default: 33 bandwidths around the median
  distance; ``_5``: 5 fixed bandwidths) at small B, skipped with a message when skada
  is not installed (``pip install .[bench]``).

JMMD rows (``--jan``) time ``tk.losses.JointMMDLoss`` with JAN's kernels (5-bandwidth
Gaussian on the features, one Gaussian with sigma 0.92 on ``softmax`` outputs of
``C = 31`` classes) against its floor (the floor above for both layers) and a naive JAN
in plain torch autograd (GEMM-form distances, every kernel matrix materialised).

Times are the process's CPU time (``time.process_time``; one thread, so this is the
compute of the call), which stays meaningful on a CPU shared with other jobs; wall time
on CUDA. Peak memory of one forward+backward is measured in a fresh subprocess per
case: on CUDA with ``torch.cuda.max_memory_allocated``, on the CPU as the increase of the
process's resident-set high-water mark over the resident size before the call.

Usage: ``python benchmarks/bench_losses.py [--quick] [--device auto] [--large]``.
Writes ``benchmarks/results/bench_losses.json`` and ``.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import transferkit as tk

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common
from _common import RESULTS, environment, load_average, write_results

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


CLASSES = 31
JAN_SIGMA = 0.92


def naive_jan(source: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """JAN's unbiased JMMD in plain torch autograd: every (2B)^2 matrix materialised."""
    joint: torch.Tensor | None = None
    for layer, (s, t) in enumerate(zip(source, target, strict=True)):
        z = torch.cat([s, t])
        sq = (z * z).sum(1)
        d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * z @ z.T).clamp_min(0.0)
        if layer == 0:
            n = z.shape[0]
            sigma2 = d2.detach().sum() / (n * (n - 1))
            k = sum(torch.exp(-d2 / (2.0 * m * sigma2)) for m in MULTIPLIERS)
        else:
            k = torch.exp(-d2 / (2.0 * JAN_SIGMA**2))
        assert isinstance(k, torch.Tensor)
        joint = k if joint is None else joint * k
    assert joint is not None
    b = source[0].shape[0]
    kss, ktt, kst = joint[:b, :b], joint[b:, b:], joint[:b, b:]
    within = (kss.sum() - kss.diagonal().sum()) / (b * (b - 1))
    within = within + (ktt.sum() - ktt.diagonal().sum()) / (b * (b - 1))
    return within - 2.0 * kst.mean()


def skada_dan_loss() -> Callable[..., torch.Tensor] | None:
    try:
        from skada.deep.losses import dan_loss
    except ImportError:
        return None
    return dan_loss  # type: ignore[no-any-return]


def make_step(name: str, batch: int, dim: int, device: torch.device) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(batch * 10_000 + dim)
    source = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
    target = (torch.randn(batch, dim, generator=generator) + 0.5).to(device).requires_grad_()
    pooled = torch.cat([source, target]).detach().requires_grad_()
    if name.startswith("jan"):
        logits_s = torch.randn(batch, CLASSES, generator=generator).to(device)
        logits_t = (torch.randn(batch, CLASSES, generator=generator) + 0.3).to(device)
        probs_s = torch.softmax(logits_s, 1).requires_grad_()
        probs_t = torch.softmax(logits_t, 1).requires_grad_()
        pooled_probs = torch.cat([probs_s, probs_t]).detach().requires_grad_()
        jan = tk.losses.JointMMDLoss(
            [tk.kernels.GaussianKernel(), tk.kernels.GaussianKernel(JAN_SIGMA, (1.0,))]
        )

        def jan_floor() -> None:
            ((pooled @ pooled.T).sum() + (pooled_probs @ pooled_probs.T).sum()).backward()

        def jan_ours() -> None:
            jan([source, probs_s], [target, probs_t]).backward()

        def jan_naive() -> None:
            naive_jan([source, probs_s], [target, probs_t]).backward()

        return {"jan_floor": jan_floor, "jan_ours": jan_ours, "jan_naive": jan_naive}[name]

    def ours() -> None:
        tk.losses.mmd(source, target).backward()

    def ours_biased() -> None:
        tk.losses.mmd(source, target, estimator="biased").backward()

    def floor() -> None:
        (pooled @ pooled.T).sum().backward()

    def broadcast() -> None:
        broadcast_mmd(source, target).backward()

    steps = {"ours": ours, "ours_biased": ours_biased, "floor": floor, "broadcast": broadcast}
    dan_loss = skada_dan_loss()
    if dan_loss is not None:
        # Fixed bandwidths for skada_5: 5 factors of 2 around the median source distance.
        median = float(torch.median(torch.cdist(source.detach(), source.detach())))
        sigmas = [median * m for m in MULTIPLIERS]

        def skada() -> None:
            dan_loss(source, target).backward()

        def skada_5() -> None:
            dan_loss(source, target, sigmas=sigmas).backward()

        steps.update(skada=skada, skada_5=skada_5)
    return steps[name]


def clock(device: torch.device) -> float:
    """CPU time of this (one-thread) process on the CPU; wall time on an accelerator."""
    return time.process_time() if device.type == "cpu" else time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, Callable[[], None]], repeats: dict[str, int], device: torch.device
) -> dict[str, float]:
    """Median seconds per call; the implementations take turns within every round."""
    if max(repeats.values()) > 3:  # warm-up round (large cases are their own warm-up)
        for step in steps.values():
            step()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for round_index in range(max(repeats.values())):
        # Rotate who goes first: a contender that follows a large allocation (page
        # faults, cold caches) is a different one every round.
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            step = steps[name]
            if round_index >= repeats[name]:
                continue
            start = clock(device)
            step()
            sync(device)
            times[name].append(clock(device) - start)
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


def default_repeats(batch: int) -> int:
    """More rounds where a call is short (and its median noisier)."""
    if batch <= 64:
        return 41
    if batch <= 256:
        return 15
    if batch <= 1024:
        return 5
    return 3


def run_case(
    kind: str,
    batch: int,
    dim: int,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Time one (kind, B, D) case; contenders interleaved; ratios to the floor."""
    n = 2 * batch
    skipped: dict[str, str] = {}
    if kind == "jan":
        names = ["jan_floor", "jan_ours", "jan_naive"]
        floor_name = "jan_floor"
    else:
        names = ["floor", "ours", "ours_biased"]
        floor_name = "floor"
        broadcast_bytes = 3 * n * n * dim * 4
        if broadcast_bytes <= args.broadcast_limit_gb * 1e9:
            names.append("broadcast")
        else:
            skipped["broadcast"] = (
                f"needs ~{broadcast_bytes / 1e9:.1f} GB > {args.broadcast_limit_gb} GB"
            )
        if batch <= args.skada_max_batch:
            if skada_dan_loss() is None:
                skipped["skada"] = "skada is not installed (pip install '.[bench]')"
                print(f"  skada row skipped: {skipped['skada']}", flush=True)
            else:
                names += ["skada", "skada_5"]
    steps = {name: make_step(name, batch, dim, device) for name in names}
    repeats = args.repeats or default_repeats(batch)
    reps = {
        name: max(1, min(repeats, 3)) if name in ("broadcast", "skada") else repeats
        for name in names
    }
    medians = time_interleaved(steps, reps, device)
    memory: dict[str, int | None] = {}
    if not args.no_memory and batch <= 256:
        memory = {name: peak_memory(name, batch, dim, device) for name in names}
    floor = medians[floor_name]
    row: dict[str, object] = {
        "kind": kind,
        "batch": batch,
        "dim": dim,
        "seconds": medians,
        "repeats": reps,
        "over_floor": {name: value / floor for name, value in medians.items()},
        "peak_bytes": memory,
        "skipped": skipped,
    }
    print(
        f"{kind:4s} B={batch:5d} D={dim:5d}  "
        + "  ".join(
            f"{name} {value * 1e3:.1f} ms ({value / floor:.2f}x)" for name, value in medians.items()
        ),
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case")
    parser.add_argument("--broadcast-limit-gb", type=float, default=2.0)
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="B per domain")
    parser.add_argument("--dims", type=int, nargs="*", default=None, help="feature dims D")
    parser.add_argument("--jan-batches", type=int, nargs="*", default=None)
    parser.add_argument("--skada-max-batch", type=int, default=256)
    parser.add_argument(
        "--large", action="store_true", help="also measure peak memory at B=8192, D=256"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--tag", default="", help="suffix of the results file names")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        name, batch, dim, device_name = args.child
        peak_memory_child(name, int(batch), int(dim), device_name)
        return

    device = tk.resolve_device(args.device)
    batches = args.batches or ([64, 256] if args.quick else [64, 256, 1024, 4096, 8192])
    dims = args.dims or ([256] if args.quick else [256, 2048])
    jan_batches = (
        args.jan_batches
        if args.jan_batches is not None
        else ([64] if args.quick else [64, 256, 1024])
    )
    load_before = load_average()
    rows: list[dict[str, object]] = []
    for dim in dims:
        for batch in batches:
            rows.append(run_case("mmd", batch, dim, device, args))
        for batch in jan_batches:
            rows.append(run_case("jan", batch, dim, device, args))
    large = large_case(device, 8192, 256) if args.large else None
    if large is not None:
        print(f"large: {large}", flush=True)

    meta = {
        **environment(device),
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "clock": "time.process_time" if device.type == "cpu" else "time.perf_counter",
        "skada": _skada_version(),
        "quick": args.quick,
        "memory_method": (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "ru_maxrss increase over the RSS before the call, fresh subprocess"
        ),
    }
    report = {"meta": meta, "rows": rows, "large": large}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_losses{args.tag}"
    write_results(RESULTS / f"{stem}.json", report, markdown(report))
    print(markdown(report))


def _skada_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("skada")
    except Exception:
        return None


def _cell(row: dict[str, Any], name: str) -> str:
    seconds = row["seconds"]
    if name not in seconds:
        return "-"
    return f"{seconds[name] * 1e3:.1f} ({row['over_floor'][name]:.2f}x)"


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"{meta['threads']} thread(s), clock {meta['clock']}, skada {meta['skada']}, "
        f"load average before {tuple(round(x, 1) for x in meta['load_average_before'])}, "
        f"after {tuple(round(x, 1) for x in meta['load_average'])}",
        "",
        "MMD (5 Gaussian bandwidths), forward+backward, ms (ratio to the GEMM floor):",
        "",
        "| B | D | floor | ours unbiased | ours biased | broadcast | skada default "
        "| skada 5 sigmas | skada_5 / ours biased |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if row["kind"] != "mmd":
            continue
        sec = row["seconds"]
        versus = f"{sec['skada_5'] / sec['ours_biased']:.2f}" if "skada_5" in sec else "-"
        lines.append(
            f"| {row['batch']} | {row['dim']} | {sec['floor'] * 1e3:.1f} | "
            + " | ".join(
                _cell(row, name)
                for name in ("ours", "ours_biased", "broadcast", "skada", "skada_5")
            )
            + f" | {versus} |"
        )
    lines += [
        "",
        f"JMMD (JAN kernels, features D + softmax of {CLASSES} classes), forward+backward, "
        "ms (ratio to its GEMM floor):",
        "",
        "| B | D | floor | ours | naive | naive / ours |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if row["kind"] != "jan":
            continue
        sec = row["seconds"]
        lines.append(
            f"| {row['batch']} | {row['dim']} | {sec['jan_floor'] * 1e3:.1f} | "
            f"{_cell(row, 'jan_ours')} | {_cell(row, 'jan_naive')} | "
            f"{sec['jan_naive'] / sec['jan_ours']:.2f} |"
        )
    memory_rows = [row for row in report["rows"] if row["peak_bytes"]]
    if memory_rows:
        lines += ["", "Peak memory of one forward+backward, MiB:", ""]
        for row in memory_rows:
            parts = ", ".join(f"{name} {mib(value)}" for name, value in row["peak_bytes"].items())
            lines.append(f"- {row['kind']} B={row['batch']} D={row['dim']}: {parts}")
    large = report.get("large")
    if isinstance(large, dict) and "seconds" in large:
        lines += [
            "",
            f"B={large['batch']} per domain, D={large['dim']}: one fwd+bwd "
            f"{large['seconds']:.1f} s (wall), peak {mib(large['peak_bytes'])} MiB = "
            f"{large['peak_over_full_matrix']:.3f} x one (2B)^2 fp32 matrix, "
            f"finite gradient: {large['finite_gradient']}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

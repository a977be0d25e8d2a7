"""Feature extraction: ``tk.extract_features`` vs a bare ``for x in loader: model(x)`` loop.

Three measurements on a ResNet-style CNN defined below (stem + four stages of basic
residual blocks, 32x32 RGB inputs):

1. Throughput (samples/s) of ``extract_features(model, loader)`` (model output, NumPy
   arrays back, eval mode, progress bar off) against the bare loop under
   ``torch.inference_mode`` that only runs the model. Runs alternate between the two and
   overhead = median over runs of ours / bare - 1 (target <= 5%).
2. Three layers (``layer2``, ``layer3``, ``layer4``, average-pooled) in one pass against one
   layer (``layer4``): time ratio (target <= 1.1).
3. Peak resident memory while extracting N = 25k / 50k / 100k small samples (3x8x8, a
   256-d feature per sample) to a disk cache, each N in a fresh subprocess: the growth of
   VmHWM (reset with /proc/self/clear_refs) over the RSS before extraction. With the cache
   it must not grow with N; the in-memory path (``cache=None``) is shown for contrast, it
   grows by N x 256 x 4 bytes.

Timing uses the process's CPU time with one torch thread on the CPU (the cores here are
shared with other jobs, which makes wall time mostly measure them) and wall time on CUDA.

Run ``python benchmarks/bench_features.py`` (``--quick`` for a fast CI run, ``--device``
to choose the device). Results go to ``benchmarks/results/bench_features.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import transferkit as tk

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _common
from _common import RESULTS, environment, write_results


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + self.down(x))
        return result


class ResNetLike(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for index, cout in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            self.add_module(
                f"layer{index}",
                nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)),
            )
            cin = cout
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        out: Tensor = self.fc(self.pool(x).flatten(1))
        return out


class SyntheticImages(Dataset[Tensor]):
    """N small images made on the fly from a fixed bank: no input memory grows with N."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bank = torch.randn(1024, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tensor:
        return self.bank[index % 1024]


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(n: int, use_cache: bool) -> dict[str, Any]:
    """Runs in a subprocess: extract n samples, report the peak-RSS growth in MiB."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 256), nn.ReLU()).eval()
    data = SyntheticImages(n)
    tk.extract_features(model, SyntheticImages(512), batch_size=256, progress=False)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = status_kb("VmRSS")
        start = time.perf_counter()
        out = tk.extract_features(
            model,
            data,
            batch_size=256,
            cache=Path(tmp) / "cache" if use_cache else None,
            progress=False,
        )
        seconds = time.perf_counter() - start
        peak = status_kb("VmHWM")
        shape = list(out.shape)
        del out
    return {
        "n": n,
        "cache": use_cache,
        "shape": shape,
        "seconds": seconds,
        "rss_before_mib": before / 1024,
        "peak_growth_mib": (peak - before) / 1024,
        "features_mib": n * 256 * 4 / 2**20,
    }


def measure_rss(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for use_cache in (True, False):
        for n in sizes:
            command = [sys.executable, __file__, "--rss-child", str(n)]
            if not use_cache:
                command.append("--no-cache")
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  rss n={n} cache={use_cache}: {rows[-1]['peak_growth_mib']:.1f} MiB")
    return rows


def timed(fn: Any) -> float:
    """CPU seconds of this process (one torch thread), or wall seconds on a GPU.

    This machine's cores are shared with other jobs, so wall time mostly measures the
    neighbours; the process's CPU time measures the work done.
    """
    clock = time.perf_counter if torch.cuda.is_available() else time.process_time
    start = clock()
    fn()
    return clock() - start


def measure_throughput(n: int, batch_size: int, repeats: int, device: str) -> dict[str, Any]:
    torch.manual_seed(0)
    target = tk.resolve_device(device)
    model = ResNetLike().to(target).eval()
    x = torch.randn(n, 3, 32, 32)
    loader = DataLoader(TensorDataset(x), batch_size=batch_size)

    def bare() -> None:
        with torch.inference_mode():
            for (batch,) in loader:
                model(batch.to(target))
        if target.type == "cuda":
            torch.cuda.synchronize()

    def ours(layers: Any = None) -> Any:
        return tk.extract_features(model, loader, layers=layers, device=target, progress=False)

    bare()
    ours()  # warm-up
    bare_times, ours_times, one_times, three_times = [], [], [], []
    for index in range(repeats):  # alternate (and swap the order), so load drift hits both
        first, second = (bare, ours) if index % 2 == 0 else (ours, bare)
        times = {first: timed(first), second: timed(second)}
        bare_times.append(times[bare])
        ours_times.append(times[ours])
        one_times.append(timed(lambda: ours(["layer4"])))
        three_times.append(timed(lambda: ours(["layer2", "layer3", "layer4"])))
    paired_overhead = statistics.median(o / b for o, b in zip(ours_times, bare_times, strict=True))
    paired_layers = statistics.median(t / o for t, o in zip(three_times, one_times, strict=True))
    med = {
        "bare": statistics.median(bare_times),
        "ours": statistics.median(ours_times),
        "one_layer": statistics.median(one_times),
        "three_layers": statistics.median(three_times),
    }
    check = ours(["layer2", "layer3", "layer4"])
    assert {k: v.shape for k, v in check.items()} == {
        "layer2": (n, 32),
        "layer3": (n, 64),
        "layer4": (n, 128),
    }
    return {
        "n": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "seconds_median": med,
        "seconds_all": {
            "bare": bare_times,
            "ours": ours_times,
            "one_layer": one_times,
            "three_layers": three_times,
        },
        "bare_samples_per_s": n / med["bare"],
        "ours_samples_per_s": n / med["ours"],
        "overhead_of_medians": med["ours"] / med["bare"] - 1.0,
        "three_vs_one_layer_of_medians": med["three_layers"] / med["one_layer"],
        "overhead": paired_overhead - 1.0,
        "three_vs_one_layer": paired_layers,
    }


def markdown(result: dict[str, Any]) -> str:
    t = result["throughput"]
    unit = "second" if result["clock"] == "wall time" else "CPU-second"
    lines = [
        f"# bench_features ({result['device']}, torch {result['torch']}, "
        f"{result['cpu_count']} CPU cores, {'quick' if result['quick'] else 'full'} run)",
        "",
        f"ResNet-style CNN, 32x32 inputs, n={t['n']}, batch {t['batch_size']}, one torch "
        f"thread, timed by {result['clock']}, "
        f"{t['repeats']} alternating runs; ratios are medians of run-by-run ratios "
        f"(ratio of medians: overhead {100 * t['overhead_of_medians']:+.1f}%, "
        f"3/1 layers {t['three_vs_one_layer_of_medians']:.3f}x). "
        f"Load average during the run: {', '.join(f'{v:.1f}' for v in result['load_average'])}.",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
        f"| bare loop (samples per {unit}) | {t['bare_samples_per_s']:.0f} | |",
        f"| extract_features (samples per {unit}) | {t['ours_samples_per_s']:.0f} | |",
        f"| overhead vs bare loop | {100 * t['overhead']:+.1f}% | <= 5% |",
        f"| 3 layers / 1 layer (one pass) | {t['three_vs_one_layer']:.3f}x | <= 1.1x |",
        "",
        "Peak RSS growth while extracting N samples (3x8x8 in, 256-d out), fresh process each:",
        "",
        "| N | cache | peak RSS growth (MiB) | features size (MiB) | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in result["rss"]:
        lines.append(
            f"| {row['n']} | {'disk' if row['cache'] else 'none (in memory)'} | "
            f"{row['peak_growth_mib']:.1f} | {row['features_mib']:.1f} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        f"Cached peak-RSS growth from the smallest to the largest N: "
        f"{result['rss_cache_growth_mib']:+.1f} MiB (flat: no growth with N).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for CI")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rss_child is not None:
        print(json.dumps(rss_child(args.rss_child, not args.no_cache)))
        return
    if args.quick:
        n, repeats, sizes = 256, 3, [5_000, 10_000, 20_000]
    else:
        n, repeats, sizes = 512, 15, [25_000, 50_000, 100_000]
    device = tk.resolve_device(args.device)
    throughput = measure_throughput(n, 128, repeats, args.device)
    rss = measure_rss(sizes)
    cached = [row for row in rss if row["cache"]]
    env = environment(device)
    result = {
        "benchmark": "bench_features",
        "quick": args.quick,
        **env,
        "device": str(device) if device.type != "cuda" else f"cuda ({env['device_name']})",
        "clock": "wall time" if torch.cuda.is_available() else "process CPU time",
        "throughput": throughput,
        "rss": rss,
        "rss_cache_growth_mib": cached[-1]["peak_growth_mib"] - cached[0]["peak_growth_mib"],
    }
    suffix = "_quick" if args.quick else ""
    table = markdown(result)
    write_results(RESULTS / f"bench_features{suffix}.json", result, table)
    print(table)


if __name__ == "__main__":
    main()

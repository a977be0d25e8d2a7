"""Fault injection for the feature cache: nothing lost, nothing stale.

Kills at random points (SIGKILL of a child process), corrupted bytes in complete and in
interrupted caches, two concurrent writer processes, a read-only folder and a full disk
(a small tmpfs; mounting needs root, else those tests are skipped with the reason). After
every fault the cache either gives exactly (bit for bit) what an uninterrupted run gives,
or raises a clear error; it never returns stale or damaged rows.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import transferkit as tk
from tests.features._helpers import FailsToMove, assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[2]
WORKER = "tests.features._fault_worker"


def worker(cache: Path, out: Path, *, delay: float = 0.0, kind: str = "dataset") -> Any:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", WORKER, str(cache), str(out), "--delay", str(delay)]
    return subprocess.Popen(
        [*command, "--kind", kind],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: Any) -> tuple[int, str]:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    calls = [line for line in stdout.splitlines() if line.startswith("calls=")]
    return int(calls[-1].split("=")[1]), stdout


def load(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out) as npz:
        return npz["features"], npz["labels"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """An uninterrupted run in a child process (same code path as the faulty runs)."""
    folder = tmp_path_factory.mktemp("reference")
    calls, _ = finish(worker(folder / "cache", folder / "out.npz"))
    assert calls == 12
    return load(folder / "out.npz")


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_sigkill_at_random_points_then_resume_is_bit_identical(
    tmp_path: Path, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    rng = random.Random(14)
    cache = tmp_path / "cache"
    kills = 0
    for _ in range(3):  # three kills, each after a random number of batches plus a jitter
        after = rng.randint(1, 4)
        process = worker(cache, tmp_path / "partial.npz", delay=0.02)
        assert process.stdout is not None
        seen = 0
        for line in process.stdout:
            seen += line.strip() == "batch"
            if seen >= after:
                break
        if seen >= after:
            import time

            time.sleep(rng.uniform(0.0, 0.03))
            process.send_signal(signal.SIGKILL)
            kills += process.wait() == -signal.SIGKILL
        else:
            process.wait()
    assert kills >= 2  # the run did not simply finish before every kill
    calls, _ = finish(worker(cache, tmp_path / "out.npz"))
    assert calls < 12  # resumed: some rows written before the kills were kept
    features, labels = load(tmp_path / "out.npz")
    np.testing.assert_array_equal(features, reference[0])
    np.testing.assert_array_equal(labels, reference[1])
    header = json.loads((cache / "header.json").read_text())
    assert header["complete"] and header["rows_done"] == 96
    assert temp_files(cache) == []  # what the killed runs left was cleaned up


def test_two_concurrent_writers_serialise_and_both_get_every_row(
    tmp_path: Path, reference: tuple[np.ndarray, np.ndarray]
) -> None:
    cache = tmp_path / "cache"
    first = worker(cache, tmp_path / "a.npz", delay=0.02)
    second = worker(cache, tmp_path / "b.npz", delay=0.02)
    calls = [finish(first)[0], finish(second)[0]]
    assert sorted(calls) == [0, 12]  # one computed everything, the other waited and reused
    for out in ("a.npz", "b.npz"):
        features, labels = load(tmp_path / out)
        np.testing.assert_array_equal(features, reference[0])
        np.testing.assert_array_equal(labels, reference[1])


# --------------------------------------------------------------------------- in process


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return tk.models.SmallCNN(num_classes=10, width=8, feature_dim=16).eval()


class Probe:
    """Kept out of the cache key (a plain object is fingerprinted by its ``repr``)."""

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at


class FailAt(nn.Module):
    def __init__(self, net: nn.Module, fail_at: int) -> None:
        super().__init__()
        self.net, self.probe = net, Probe(fail_at)

    def forward(self, x: Tensor) -> Tensor:
        self.probe.calls += 1
        if self.probe.calls == self.probe.fail_at:
            raise KeyboardInterrupt
        out: Tensor = self.net(x)
        return out


X = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
Y = torch.arange(64) % 10


def extract(cache: Path | None, fail_at: int = -1) -> Any:
    """Features of (X, Y) through a SmallCNN wrapped in ``FailAt`` (same cache key)."""
    return tk.extract_features(
        FailAt(small_model(), fail_at),
        torch.utils.data.TensorDataset(X, Y),
        layers="net.neck",
        batch_size=8,
        cache=cache,
        progress=False,
    )


EXPECTED = extract(None)


def data_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.npy"))


def flip(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("seed", range(8))
def test_corrupt_bytes_in_a_complete_cache_never_come_back(tmp_path: Path, seed: int) -> None:
    extract(tmp_path)
    rng = random.Random(seed)
    path = rng.choice([*data_files(tmp_path), tmp_path / "header.json"])
    position = rng.randrange(path.stat().st_size)
    flip(path, position)
    try:
        result, message = extract(tmp_path), ""
    except ValueError as err:
        result, message = None, str(err)
    if result is None:  # a clear error that names the damage and the way out
        assert message.startswith("cache:") and "delete" in message
    else:  # or exactly the right rows
        np.testing.assert_array_equal(result[0], EXPECTED[0])
        np.testing.assert_array_equal(result[1], EXPECTED[1])


@pytest.mark.parametrize("seed", range(6))
def test_corrupt_bytes_in_an_interrupted_cache_are_recomputed(
    tmp_path: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(100 + seed)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path, fail_at=rng.randint(2, 7))
    header = json.loads((tmp_path / "header.json").read_text())
    done = header["rows_done"]
    assert 0 < done < 64 and not header["complete"]
    for _ in range(3):  # damage rows recorded as done
        path = rng.choice(data_files(tmp_path))
        array = np.load(path, mmap_mode="r")
        offset = int(array.offset)
        row = array.nbytes // len(array)
        del array
        flip(path, offset + rng.randrange(done * row))
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        features, labels = extract(tmp_path)
    assert "failed their checksum" in caplog.text
    np.testing.assert_array_equal(features, EXPECTED[0])
    np.testing.assert_array_equal(labels, EXPECTED[1])
    assert json.loads((tmp_path / "header.json").read_text())["complete"]


# --------------------------------------------------------------------------- mounts


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
    point.mkdir()
    yield point
    gc.collect()  # memory-mapped results keep the mount busy
    while subprocess.run(["umount", str(point)], capture_output=True, check=False).returncode == 0:
        pass  # a bind mount remounted read-only may be stacked


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(args)}): {done.stderr.strip()} (needs root)")


def test_a_read_only_folder_serves_a_complete_cache_and_refuses_to_write(
    mount_point: Path,
) -> None:
    cache = mount_point / "cache"
    extract(cache)
    empty = mount_point / "empty"
    empty.mkdir()
    mount("--bind", str(mount_point), str(mount_point))
    mount("-o", "remount,bind,ro", str(mount_point))
    features, labels = extract(cache)  # reading and verifying needs no write
    np.testing.assert_array_equal(features, EXPECTED[0])
    np.testing.assert_array_equal(labels, EXPECTED[1])
    del features, labels
    with pytest.raises(OSError, match=r"cache: cannot write to .*empty.*Read-only"):
        extract(empty)


def test_a_full_disk_raises_and_a_later_run_resumes_exactly(mount_point: Path) -> None:
    mount("-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount_point))
    cache = mount_point / "cache"
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # 768 KiB out
    net = nn.Flatten()
    expected = tk.extract_features(net, x, batch_size=8, progress=False)
    with pytest.raises(OSError, match=r"cache: cannot write to .*No space left"):
        tk.extract_features(net, x, batch_size=8, cache=cache, progress=False)
    assert temp_files(cache) == []
    mount("-o", "remount,size=4m", str(mount_point))
    resumed = tk.extract_features(net, x, batch_size=8, cache=cache, progress=False)
    np.testing.assert_array_equal(resumed, expected)
    del resumed
    assert temp_files(cache) == []


# --------------------------------------------------------------------------- random sequences


class Flaky(nn.Module):
    """SmallCNN raising KeyboardInterrupt from forward call ``probe.fail_at`` on."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.probe = small_model(), Probe(-1)

    def forward(self, x: Tensor) -> Tensor:
        self.probe.calls += 1
        if 0 < self.probe.fail_at <= self.probe.calls:
            raise KeyboardInterrupt
        out: Tensor = self.net(x)
        return out


def close(a: Any, b: Any) -> bool:
    """Equal up to the float rounding of another batch composition (about 1e-8)."""
    if isinstance(a, tuple):
        return all(close(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("seed", [4, 11, 15])  # seeds on which the pre-review cache failed
def test_random_sequences_of_runs_faults_and_damage_never_give_stale_rows(
    tmp_path: Path, seed: int
) -> None:
    """Each step: new data (rows swapped or changed), model, layers, batch size and data
    kind; maybe a flipped bit or a truncation in a data file or the header; a run that
    may be interrupted. A finished run must equal a fresh one; the only error allowed is
    a ValueError for a damaged complete cache or a damaged header (then the folder is
    deleted, as the message says)."""
    rng = random.Random(seed)
    net, cache = Flaky(), tmp_path / "cache"
    base = torch.randn(23, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    finished = 0
    may_raise = False  # damage to a complete cache (or a header) that no run has seen yet
    for _ in range(60):
        x = base.clone()
        if rng.random() < 0.3:
            x[[1, 2]] = x[[2, 1]]
        if rng.random() < 0.3:
            x[rng.randrange(23)] += 1.0
        if rng.random() < 0.1:
            with torch.no_grad():
                net.net.fc.bias[0] += 0.5
        data: Any = x if rng.random() < 0.5 else torch.utils.data.TensorDataset(x, Y[:23])
        kwargs: dict[str, Any] = {
            "layers": rng.choice(["net.neck", ["net.features", "net.neck"]]),
            "batch_size": rng.choice([4, 5, 8]),
            "progress": False,
        }
        net.probe.fail_at = -1
        fresh = tk.extract_features(net, data, **kwargs)
        header = cache / "header.json"
        files = sorted(cache.glob("*.npy"))
        complete = header.exists() and json.loads(header.read_text()).get("complete") is True
        damage = rng.random()
        if files and damage < 0.25:
            path = rng.choice(files)
            flip(path, rng.randrange(path.stat().st_size))
            may_raise |= complete
        elif header.exists() and damage < 0.3:
            flip(header, rng.randrange(header.stat().st_size))
            may_raise = True
        elif files and damage < 0.35:
            path = rng.choice(files)
            path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])
            may_raise |= complete
        net.probe.calls, net.probe.fail_at = 0, rng.choice([-1, -1, 1, 2, 3])
        try:
            got = tk.extract_features(net, data, cache=cache, **kwargs)
        except KeyboardInterrupt:
            continue
        except ValueError:
            if not may_raise:
                raise
            for path in cache.iterdir():
                path.unlink()
            may_raise = False
            continue
        assert close(got, fresh)
        finished += 1
        may_raise = False  # a finished run verified or recomputed every row
    assert finished >= 10


def test_a_move_that_fails_half_way_leaves_the_model_exactly_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fault injection (a CPU-only run never moves the model): force a move to the meta
    # device, which loses the data of every module moved before "late", whose move then
    # fails like an out-of-memory error half-way.
    torch.manual_seed(0)
    net: nn.Module = tk.models.SmallCNN(num_classes=10, width=8, feature_dim=16).double()
    net.train()
    net.fc.eval()  # per-submodule modes must come back too
    net.features[0].weight.grad = torch.ones_like(net.features[0].weight)
    net.add_module("late", FailsToMove())
    monkeypatch.setattr("transferkit.features._guard._same_device", lambda a, b: False)
    monkeypatch.setattr("transferkit.features._planner._check_not_meta", lambda m, d: None)
    data = torch.randn(12, 1, 16, 16, dtype=torch.float64)
    before = snapshot(net)
    with pytest.raises(torch.OutOfMemoryError):
        tk.extract_features(net, data, batch_size=4, device="meta", progress=False)
    assert_unchanged(net, before)
    monkeypatch.undo()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and bool((first.weight.grad == 1).all())
    assert first.weight.grad.device.type == "cpu"
    out = tk.extract_features(net, data[:4], progress=False)  # still usable
    assert np.isfinite(out).all()

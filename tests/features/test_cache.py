"""The disk cache: reuse, resume, checksums, corruption (features/_cache.py)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import transferkit as tk
from tests.features._helpers import Counting, images, small_cnn


def test_cache_second_call_reads_without_running_the_model(tmp_path: Path) -> None:
    net, x = Counting(small_cnn()), images(30)
    y = torch.arange(30) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    layers = ["net.features", "net.neck"]
    first, _ = tk.extract_features(net, loader, layers=layers, cache=tmp_path, progress=False)
    calls = net.calls
    assert calls == 4
    second, labels2 = tk.extract_features(
        net, loader, layers=layers, cache=tmp_path, progress=False
    )
    assert net.calls == calls
    assert list(second) == layers
    for name in layers:
        np.testing.assert_array_equal(second[name], first[name])
    np.testing.assert_array_equal(labels2, y.numpy())
    header = json.loads((tmp_path / "header.json").read_text())
    assert header["rows_done"] == header["num_rows"] == 30 and header["complete"]
    assert header["layers"] == layers and header["batch_size"] == 8
    assert header["files"]["net.neck"]["shape"] == [30, 16]


@pytest.mark.parametrize("kind", ["tensor", "loader"])
def test_interrupted_extraction_resumes_and_equals_an_uninterrupted_one(
    tmp_path: Path, kind: str
) -> None:
    x, y = images(100), torch.arange(100)

    def data() -> Any:
        return x if kind == "tensor" else DataLoader(TensorDataset(x, y), batch_size=16)

    reference = tk.extract_features(
        small_cnn(), data(), layers="neck", batch_size=16, progress=False
    )
    failing = Counting(small_cnn(), fail_at=4)
    with pytest.raises(RuntimeError, match="interrupted"):
        tk.extract_features(
            failing, data(), layers="net.neck", batch_size=16, cache=tmp_path, progress=False
        )
    header = json.loads((tmp_path / "header.json").read_text())
    assert header["rows_done"] == 48 and not header["complete"]
    resumed_net = Counting(small_cnn())
    resumed = tk.extract_features(
        resumed_net, data(), layers="net.neck", batch_size=16, cache=tmp_path, progress=False
    )
    assert resumed_net.calls == 4  # rows 48..99, not the three batches already on disk
    if kind == "loader":
        resumed, labels = resumed
        np.testing.assert_array_equal(labels, y.numpy())
        reference = reference[0]
    np.testing.assert_allclose(resumed, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "missing"])
def test_a_corrupted_cache_raises_a_clear_error(tmp_path: Path, damage: str) -> None:
    net, x = small_cnn(), images(40)
    tk.extract_features(net, x, layers="neck", cache=tmp_path, progress=False)
    features = tmp_path / "features_0.npy"
    if damage == "truncate":
        with open(features, "r+b") as handle:
            handle.truncate(features.stat().st_size // 2)
    elif damage == "flip":
        raw = bytearray(features.read_bytes())
        raw[-10] ^= 0xFF
        features.write_bytes(bytes(raw))
    elif damage == "header":
        text = (tmp_path / "header.json").read_text()
        (tmp_path / "header.json").write_text(text[: len(text) // 2])
    else:
        features.unlink()
    with pytest.raises(ValueError, match=r"cache: .*(corrupted or truncated|missing).*delete"):
        tk.extract_features(net, x, layers="neck", cache=tmp_path, progress=False)


def test_a_shuffling_loader_cannot_be_cached(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(images(8)), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="RandomSampler.*shuffle=False"):
        tk.extract_features(small_cnn(), loader, cache=tmp_path, progress=False)


def test_cached_arrays_are_memory_mapped_copy_on_write(tmp_path: Path) -> None:
    net, x = small_cnn(), images(10)
    tk.extract_features(net, x, cache=tmp_path, progress=False)
    cached = tk.extract_features(net, x, cache=tmp_path, progress=False)
    assert isinstance(cached, np.memmap)
    cached[0] = 123.0  # does not reach the file
    again = tk.extract_features(net, x, cache=tmp_path, progress=False)
    assert not np.any(again[0] == 123.0)


def test_a_corrupted_row_of_an_interrupted_cache_is_recomputed_not_blessed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = images(100)
    reference = tk.extract_features(small_cnn(), x, layers="neck", batch_size=16, progress=False)
    failing = Counting(small_cnn(), fail_at=4)
    with pytest.raises(RuntimeError, match="interrupted"):
        tk.extract_features(
            failing, x, layers="net.neck", batch_size=16, cache=tmp_path, progress=False
        )
    assert json.loads((tmp_path / "header.json").read_text())["rows_done"] == 48
    stored = np.load(tmp_path / "features_0.npy", mmap_mode="r+")
    stored[20, 3] += 1.0  # a row already recorded as done (chunk 16..32)
    stored.flush()
    del stored
    resumed_net = Counting(small_cnn())
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        resumed = tk.extract_features(
            resumed_net, x, layers="net.neck", batch_size=16, cache=tmp_path, progress=False
        )
    assert resumed_net.calls == 5  # rows 16..32 again, then 48..99
    assert "failed their checksum (first: rows 16..32 of features_0.npy)" in caplog.text
    np.testing.assert_array_equal(resumed, reference)


def test_a_run_killed_while_allocating_the_files_is_restarted_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = TensorDataset(images(10), torch.arange(10))
    kwargs: dict[str, Any] = {"layers": "neck", "batch_size": 4, "progress": False}
    reference, labels = tk.extract_features(small_cnn(), data, **kwargs)
    real = np.lib.format.open_memmap
    calls: list[int] = []

    def killed_at_the_second_file(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # features_0.npy allocated, labels.npy not yet
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(np.lib.format, "open_memmap", killed_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        tk.extract_features(small_cnn(), data, cache=tmp_path, **kwargs)
    monkeypatch.undo()
    assert (tmp_path / "features_0.npy").exists() and not (tmp_path / "labels.npy").exists()
    got, got_labels = tk.extract_features(small_cnn(), data, cache=tmp_path, **kwargs)
    np.testing.assert_array_equal(got, reference)
    np.testing.assert_array_equal(got_labels, labels)


class ExitsAtItem(Dataset[Tensor]):
    """Rows of ``x``; loading item ``exit_at`` kills the process (``os._exit``: no cleanup)."""

    def __init__(self, x: Tensor, exit_at: int | None = None) -> None:
        self.x, self.exit_at = x, exit_at

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> Tensor:
        if index == self.exit_at:
            os._exit(0)
        return self.x[index]


def _update_then_die(data: ExitsAtItem, folder: Path) -> None:
    tk.extract_features(
        small_cnn(), data, layers="neck", batch_size=4, cache=folder, progress=False
    )


def test_a_run_killed_while_updating_a_complete_cache_resumes_without_an_error(
    tmp_path: Path,
) -> None:
    x = images(12)
    kwargs: dict[str, Any] = {"layers": "neck", "batch_size": 4, "progress": False}
    reference = tk.extract_features(small_cnn(), ExitsAtItem(x), cache=tmp_path, **kwargs).copy()
    changed = x.clone()
    changed[0] += 1.0
    # Killed right after the changed chunk's rows were written (while loading the next
    # batch), well within the header's save interval: no header save after them.
    child = multiprocessing.get_context("fork").Process(
        target=_update_then_die, args=(ExitsAtItem(changed, exit_at=4), tmp_path)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    header = json.loads((tmp_path / "header.json").read_text())
    assert not header["complete"]  # the update was under way when the process died
    # The header still has the old chunk, whose rows on disk are now the changed ones.
    got = tk.extract_features(small_cnn(), ExitsAtItem(x), cache=tmp_path, **kwargs)
    np.testing.assert_array_equal(got, reference)


def test_python_object_labels_are_never_pickled_into_the_cache(tmp_path: Path) -> None:
    items = [(torch.full((4,), float(i)), {"id": i}) for i in range(6)]
    loader = DataLoader(
        items,  # type: ignore[arg-type]
        batch_size=3,
        collate_fn=lambda b: (torch.stack([x for x, _ in b]), [y for _, y in b]),
    )
    _, labels = tk.extract_features(nn.Linear(4, 2), loader, progress=False)
    assert labels.tolist() == [{"id": i} for i in range(6)]
    with pytest.raises(TypeError, match=r"labels: Python objects \(dtype object\)"):
        tk.extract_features(nn.Linear(4, 2), loader, cache=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.npy"))


def test_a_npy_header_switched_to_fortran_order_is_caught(tmp_path: Path) -> None:
    net, x = small_cnn(), images(12)
    tk.extract_features(net, x, layers="neck", cache=tmp_path, progress=False)
    path = tmp_path / "features_0.npy"
    raw = path.read_bytes()
    assert raw.count(b"'fortran_order': False") == 1
    # Same file size, same data bytes (so every chunk checksum still matches).
    path.write_bytes(raw.replace(b"'fortran_order': False", b"'fortran_order': True "))
    with pytest.raises(ValueError, match="features_0.npy is corrupted .*not in C order"):
        tk.extract_features(net, x, layers="neck", cache=tmp_path, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_file_of_an_interrupted_cache_is_recomputed(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    x = images(40)
    kwargs: dict[str, Any] = {"layers": "neck", "batch_size": 8, "progress": False}
    reference = tk.extract_features(small_cnn(), x, **kwargs)
    with pytest.raises(RuntimeError, match="interrupted"):
        tk.extract_features(
            Counting(small_cnn(), fail_at=3), x, cache=tmp_path, **{**kwargs, "layers": "net.neck"}
        )
    path = tmp_path / "features_0.npy"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        got = tk.extract_features(
            Counting(small_cnn()), x, cache=tmp_path, **{**kwargs, "layers": "net.neck"}
        )
    np.testing.assert_array_equal(got, reference)
    assert "the cache was incomplete, so it is recomputed" in caplog.text


def test_every_bit_flip_in_a_npy_header_is_caught_or_harmless(tmp_path: Path) -> None:
    net, x = small_cnn(), images(12)
    kwargs: dict[str, Any] = {"layers": "neck", "batch_size": 4, "progress": False}
    reference = tk.extract_features(net, x, cache=tmp_path, **kwargs).copy()
    path = tmp_path / "features_0.npy"
    original = path.read_bytes()
    with open(path, "rb") as handle:  # the header ends where the data starts
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        header_end = handle.tell()
    messages: list[str] = []
    harmless = 0
    for position in range(header_end):
        for bit in (0x01, 0x20):
            damaged = bytearray(original)
            damaged[position] ^= bit
            path.write_bytes(bytes(damaged))
            try:  # a ValueError, never another exception type
                got = tk.extract_features(net, x, cache=tmp_path, **kwargs)
            except ValueError as err:
                messages.append(str(err))
                continue
            np.testing.assert_array_equal(got, reference)  # e.g. a padding space
            harmless += 1
            del got  # (a map of the file that the next write_bytes truncates)
    path.write_bytes(original)
    assert messages and harmless
    assert all("features_0.npy is corrupted" in message for message in messages)


def test_rows_computed_under_the_callers_autocast_are_never_reused_as_full_precision(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # amp=False inside a caller's torch.autocast block runs the model in bfloat16: the
    # cache used to record amp=None for those rows and hand them back to a later
    # full-precision call (and full-precision rows to a later autocast call).
    net, x = Counting(small_cnn()), images(24)
    full = tk.extract_features(net, x, layers="net.neck", progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = tk.extract_features(net, x, layers="net.neck", cache=tmp_path, progress=False)
        again = tk.extract_features(net, x, layers="net.neck", cache=tmp_path, progress=False)
    assert np.abs(half - full).max() > 1e-4  # really computed in bfloat16
    np.testing.assert_array_equal(again, half)  # and reused while the autocast is the same
    calls = net.calls
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        later = tk.extract_features(net, x, layers="net.neck", cache=tmp_path, progress=False)
    assert net.calls > calls, "bfloat16 rows were served to a full-precision call"
    np.testing.assert_array_equal(later, full)
    assert "different amp" in caplog.text
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rerun = tk.extract_features(net, x, layers="net.neck", cache=tmp_path, progress=False)
    np.testing.assert_array_equal(rerun, half)  # full-precision rows not served either


def test_the_cache_key_records_the_autocast_in_effect_not_the_amp_flag(tmp_path: Path) -> None:
    # amp=True is bfloat16/float16 on CUDA but no autocast at all on CPU: keyed by the flag,
    # a cache written with amp=True on a GPU was reused by amp=True on a CPU.
    net, x = Counting(small_cnn()), images(16)
    plain = tk.extract_features(net, x, layers="net.neck", cache=tmp_path, progress=False)
    calls = net.calls
    # on CPU amp=True is the very same computation, so the rows are reused ...
    same = tk.extract_features(
        net, x, layers="net.neck", cache=tmp_path, amp=True, device="cpu", progress=False
    )
    assert net.calls == calls
    np.testing.assert_array_equal(same, plain)
    # ... and the header names the autocast dtype and device type when there is one
    tk.extract_features(
        net, x, layers="net.neck", cache=tmp_path, amp=torch.bfloat16, progress=False
    )
    header = json.loads((tmp_path / "header.json").read_text())
    assert header["fingerprint"]["amp"] == "cpu:bfloat16"


@pytest.mark.cuda
def test_amp_true_rows_of_a_gpu_are_not_reused_on_the_cpu(tmp_path: Path) -> None:
    net, x = Counting(small_cnn()), images(16)
    gpu = tk.extract_features(
        net, x, layers="net.neck", cache=tmp_path, amp=True, device="cuda", progress=False
    )
    calls = net.calls
    cpu = tk.extract_features(
        net, x, layers="net.neck", cache=tmp_path, amp=True, device="cpu", progress=False
    )
    assert net.calls > calls
    full = tk.extract_features(net, x, layers="net.neck", device="cpu", progress=False)
    np.testing.assert_array_equal(cpu, full)
    assert np.abs(gpu - full).max() > 0


@given(
    perm_seed=st.integers(0, 2**16),
    batch=st.integers(1, 9),
    second_batch=st.integers(1, 9),
    swap=st.booleans(),
)
@settings(max_examples=20, deadline=None)
def test_rows_come_back_in_input_order_after_any_reordering_of_cached_data(
    perm_seed: int, batch: int, second_batch: int, swap: bool
) -> None:
    # Property: whatever the cache holds (the data in another order, cached with another
    # batch size), each returned row is the feature of the input row at that position.
    import tempfile

    net = small_cnn()
    x = images(13)
    reference = tk.extract_features(net, x, layers="neck", progress=False)
    perm = np.random.default_rng(perm_seed).permutation(13)
    first, second = (x[perm], x) if swap else (x, x[perm])
    with tempfile.TemporaryDirectory() as folder:
        tk.extract_features(
            net, first, layers="neck", batch_size=batch, cache=folder, progress=False
        )
        got = tk.extract_features(
            net, second, layers="neck", batch_size=second_batch, cache=folder, progress=False
        )
    expected = reference if swap else reference[perm]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

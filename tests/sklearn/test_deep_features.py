"""``DeepFeatures`` (transferkit/sklearn/_deep_features.py) on array inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

import transferkit as tk
from tests.sklearn._reference import small_net
from transferkit.sklearn import DeepFeatures


def test_deep_features_returns_the_model_features_and_clones():
    net = small_net()
    images = tk.datasets.digits(None, seed=0).source_x[:20]
    flat = images.flatten(1).numpy()
    features = DeepFeatures(net, layers="neck", input_shape=(1, 16, 16)).fit_transform(flat)
    with torch.no_grad():
        expected = net.eval().forward_features(images).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    copy = clone(DeepFeatures(net, layers="neck", input_shape=(1, 16, 16)))
    assert copy.model is not net
    np.testing.assert_allclose(copy.transform(flat), features, rtol=1e-5, atol=1e-6)


def test_deep_features_concatenates_layers_and_applies_the_input_transform():
    net = small_net()
    images = tk.datasets.digits(None, seed=0).source_x[:8]
    both = DeepFeatures(net, layers=["neck", "fc"]).fit_transform(images)
    assert both.shape == (8, 16 + 10)
    flipped = DeepFeatures(net, layers="fc", input_transform=lambda t: t.flip(-1))
    with torch.no_grad():
        expected = net.eval()(images.flip(-1)).numpy()
    np.testing.assert_allclose(flipped.fit_transform(images), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="input_shape"):
        DeepFeatures(net, input_shape=(1, 8, 8)).fit_transform(images.flatten(1))


@pytest.mark.parametrize("kind", ["requires_grad", "bfloat16"])
def test_deep_features_take_grad_and_bfloat16_tensors(kind):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    rows = torch.randn(10, 4)
    given = rows.clone().requires_grad_(True) if kind == "requires_grad" else rows.bfloat16()
    expected = DeepFeatures(net, device="cpu", progress=False).fit_transform(
        given.detach().float().numpy()
    )
    got = DeepFeatures(net, device="cpu", progress=False).fit_transform(given)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

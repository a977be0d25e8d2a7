"""Argument checks and the one plan of `extract_features` (features/_planner.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import transferkit as tk
from tests.features._helpers import images, small_cnn


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (images(4), {"batch_size": 0}, ValueError, "batch_size"),
        ([1, 2, 3], {}, TypeError, "data"),
        (torch.zeros(0, 1, 16, 16), {}, ValueError, "data"),
        (torch.full((2, 1, 16, 16), math.nan), {}, ValueError, "data"),
        (images(4), {"amp": "yes"}, TypeError, "amp"),
        (images(4), {"cache": 3}, TypeError, "cache"),
    ],
)
def test_extract_features_validates_its_arguments(
    data: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        tk.extract_features(small_cnn(), data, progress=False, **kwargs)


def test_extract_features_refuses_layers_for_an_extractor() -> None:
    extractor = tk.FeatureExtractor(small_cnn(), "neck")
    with pytest.raises(ValueError, match="layers"):
        tk.extract_features(extractor, images(2), layers="fc", progress=False)
    out = tk.extract_features(extractor, images(3), progress=False)
    assert out.shape == (3, 16)


def test_progress_bar_is_shown_and_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    tk.extract_features(small_cnn(), images(4), progress=True)
    assert "extract_features" in capsys.readouterr().err
    tk.extract_features(small_cnn(), images(4), progress=False)
    assert capsys.readouterr().err == ""


def test_a_model_on_the_meta_device_is_refused_clearly() -> None:
    with torch.device("meta"):
        net = tk.models.SmallCNN()
    with pytest.raises(ValueError, match=r"model: .* is on the meta device.*to_empty"):
        tk.extract_features(net, images(2), progress=False)


def test_a_model_with_uninitialised_lazy_modules_is_refused_and_left_intact() -> None:
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.LazyLinear(3), nn.ReLU()), torch.randn(5, 4)
    with pytest.raises(ValueError, match="model: '0.weight' .* uninitialised lazy parameter"):
        tk.extract_features(net, x, progress=False)
    assert isinstance(net[0], nn.LazyLinear)
    net(x).sum().backward()  # still initialises and trains normally
    assert net[0].weight.shape == (3, 4)
    assert tk.extract_features(net, x, progress=False).shape == (5, 3)


@pytest.mark.parametrize("cache", ["", "  "])
def test_an_empty_cache_path_is_refused_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cache: expected a directory path, got an empty"):
        tk.extract_features(nn.Identity(), torch.ones(3, 2), cache=cache, progress=False)
    assert not list(tmp_path.iterdir())


def test_a_pool_or_early_stop_that_an_extractor_would_ignore_raises() -> None:
    # pool and early_stop come from a FeatureExtractor; extract_features(extractor,
    # pool="max") returned the extractor's average pooling with no error.
    net, x = small_cnn(), images(3)
    extractor = tk.FeatureExtractor(net, "features")
    with pytest.raises(ValueError, match="pool: the FeatureExtractor pools with 'avg'"):
        tk.extract_features(extractor, x, pool="max", progress=False)
    with pytest.raises(ValueError, match="pool"):
        tk.extract_features(extractor, x, pool=None, progress=False)
    with pytest.raises(ValueError, match="early_stop"):
        tk.extract_features(extractor, x, early_stop=True, progress=False)
    # the extractor's own settings, or the defaults, are accepted
    peak = tk.FeatureExtractor(net, "features", pool="max")
    out = tk.extract_features(peak, x, pool="max", progress=False)
    np.testing.assert_array_equal(out, tk.extract_features(peak, x, progress=False))
    expected = tk.extract_features(net, x, layers="features", pool="max", progress=False)
    np.testing.assert_array_equal(out, expected)

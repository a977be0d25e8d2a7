"""Pooling to (N, D): feature maps, token sequences and `masked_mean` (features/_pool.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import transferkit as tk
from tests.features._helpers import POOLS, TokenNet, images, numpy_pool, small_cnn
from transferkit.features import masked_mean


@pytest.mark.parametrize("pool", POOLS)
def test_pooling_of_feature_maps_matches_numpy(pool: Any) -> None:
    net, x = small_cnn(), images()
    with torch.no_grad():
        maps = net.features[1](net.features[0](x)).numpy()
        out = tk.FeatureExtractor(net, "features.1", pool=pool)(x)
    np.testing.assert_allclose(out.numpy(), numpy_pool(maps, pool), rtol=1e-5, atol=1e-6)


def test_token_sequences_pool_over_tokens_and_respect_the_attention_mask() -> None:
    torch.manual_seed(0)
    net, x = TokenNet(), torch.randn(4, 7, 3)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 1:] = 0
    with torch.no_grad():
        tokens = net(x)
        assert tk.FeatureExtractor(net, "mix", pool=None)(x).shape == (4, 7, 5)
        torch.testing.assert_close(tk.FeatureExtractor(net, "mix", pool="avg")(x), tokens.mean(1))
        torch.testing.assert_close(tk.FeatureExtractor(net, "mix", pool="token")(x), tokens[:, 0])
        torch.testing.assert_close(tk.FeatureExtractor(net, "mix", pool="max")(x), tokens.amax(1))
        masked = tk.FeatureExtractor(net, "mix", pool="avg")(x, attention_mask=mask)
    expected = np.stack([tokens[i, : int(mask[i].sum())].numpy().mean(axis=0) for i in range(4)])
    np.testing.assert_allclose(masked.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_token_pooling_of_a_feature_map_is_rejected() -> None:
    with pytest.raises(ValueError, match="'token'"):
        tk.FeatureExtractor(small_cnn(), "features", pool="token")(images(2))


def test_masked_mean_matches_numpy_and_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(5, 6, 3)).astype(np.float32)
    lengths = np.array([6, 1, 3, 0, 4])
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
    out = masked_mean(torch.from_numpy(hidden), torch.from_numpy(mask)).numpy()
    for i, length in enumerate(lengths):
        expected = hidden[i, :length].mean(axis=0) if length else np.zeros(3)
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-6)
    padded = np.concatenate([hidden, np.full((5, 4, 3), 99.0, np.float32)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((5, 4), np.int64)], axis=1)
    again = masked_mean(torch.from_numpy(padded), torch.from_numpy(padded_mask)).numpy()
    np.testing.assert_allclose(again, out, rtol=1e-6)


def test_masked_mean_computes_in_float32_for_half_inputs_and_checks_shapes() -> None:
    hidden = torch.randn(2, 3, 4).to(torch.bfloat16)
    assert masked_mean(hidden, torch.ones(2, 3)).dtype == torch.float32
    with pytest.raises(ValueError, match="attention_mask"):
        masked_mean(torch.randn(2, 3, 4), torch.ones(2, 4))

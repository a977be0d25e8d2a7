"""One pooling for heads and features: ClassifierHead and FeatureExtractor agree exactly.

Tests the shared pooling through the two public classes that use it (no private import).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import transferkit as tk
from transferkit.features import masked_mean

MODES = ["avg", "max", "avgmax", "token"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = {"map": (3, 6, 4, 5), "tokens": (3, 7, 6)}


class Passthrough(nn.Module):
    """Returns its input: the extractor then pools exactly what the head is given."""

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return x


def head_pool(x: Tensor, mode: str, mask: Tensor | None = None) -> Tensor:
    width = x.shape[1] if x.dim() == 4 else x.shape[-1]
    head = tk.ClassifierHead(width, 2, hidden=(), dropout=0.0, pool=mode)  # type: ignore[arg-type]
    return head.pool(x) if mask is None else head.pool(x, mask)


def features_pool(x: Tensor, mode: str, mask: Tensor | None = None) -> Tensor:
    with tk.FeatureExtractor(Passthrough(), pool=mode) as extractor:  # type: ignore[arg-type]
        out = extractor(x) if mask is None else extractor(x, attention_mask=mask)
    assert isinstance(out, Tensor)
    return out


def numpy_pool(x: np.ndarray, mode: str, mask: np.ndarray | None = None) -> np.ndarray:
    """Independent float64 reference."""
    x = x.astype(np.float64)
    if mode == "token":
        return x[:, 0]
    if x.ndim == 4:
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        avg, peak = flat.mean(axis=2), flat.max(axis=2)
    elif mask is None:
        avg, peak = x.mean(axis=1), x.max(axis=1)
    else:
        keep = mask.astype(bool)[:, :, None]
        counts = np.maximum(keep.sum(axis=1), 1)
        avg = np.where(keep, x, 0.0).sum(axis=1) / counts
        peak = np.where(keep, x, -np.inf).max(axis=1)
        peak = np.where(keep.any(axis=1), peak, 0.0)
    return {"avg": avg, "max": peak, "avgmax": np.concatenate([avg, peak], axis=1)}[mode]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", MODES)
def test_heads_and_features_pool_identically_for_every_mode_layout_and_dtype(
    mode: str, layout: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    x = torch.randn(*LAYOUTS[layout]).to(dtype)
    if mode == "token" and layout == "map":
        for pool in (head_pool, features_pool):
            with pytest.raises(ValueError, match="'token'"):
                pool(x, mode)
        return
    from_head, from_features = head_pool(x, mode), features_pool(x, mode)
    # the head hands its layers the input's dtype back; features keep float32 averages
    assert from_head.dtype == dtype
    expected_dtype = (
        dtype if mode == "token" or mode == "max" else torch.promote_types(dtype, torch.float32)
    )
    assert from_features.dtype == expected_dtype
    assert torch.equal(from_head, from_features.to(dtype))
    reference = numpy_pool(x.double().numpy(), mode)
    np.testing.assert_allclose(from_features.double().numpy(), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_heads_and_features_ignore_padding_tokens_identically(mode: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 6, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6])
    from_head, from_features = head_pool(x, mode, mask), features_pool(x, mode, mask)
    torch.testing.assert_close(from_head, from_features, rtol=0, atol=0)
    np.testing.assert_allclose(
        from_head.double().numpy(), numpy_pool(x.numpy(), mode, mask.numpy()), atol=1e-6
    )
    # padding does not change the result: a longer padded batch pools the same
    padded = torch.cat([x, 100 * torch.randn(4, 3, 5)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(4, 3, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(head_pool(padded, mode, padded_mask), from_head)
    if mode == "avg":
        torch.testing.assert_close(from_head, masked_mean(x, mask))


def test_classifier_head_logits_ignore_padding_with_an_attention_mask() -> None:
    torch.manual_seed(2)
    head = tk.ClassifierHead(5, 3, hidden=(4,), pool="avgmax").eval()
    x, mask = torch.randn(2, 4, 5), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    longer = torch.cat([x, torch.randn(2, 2, 5)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 2, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(head(x, mask), head(longer, attention_mask=longer_mask))
    torch.testing.assert_close(head(x[:1, :2]), head(x[:1], mask[:1]))


def test_attention_masks_are_checked_by_heads_and_features() -> None:
    x = torch.randn(2, 3, 4)
    head = tk.ClassifierHead(4, 2, hidden=(), pool="max")
    with pytest.raises(ValueError, match="attention_mask"):
        head(x, torch.full((2, 3), 0.5))  # not a 0/1 mask
    with pytest.raises(ValueError, match="attention_mask"):
        head(x, torch.ones(2, 5))  # wrong length
    with pytest.raises(ValueError, match="attention_mask"):
        head(torch.randn(2, 4, 3, 3), torch.ones(2, 4))  # a map has no tokens
    with pytest.raises(ValueError, match="attention_mask"):
        tk.ClassifierHead(4, 2, hidden=(), pool=None)(torch.randn(2, 4), torch.ones(2, 1))


@pytest.mark.parametrize("mode", ["max", "avgmax"])
def test_feature_extractor_rejects_a_non_binary_mask_for_max_pooling(mode: str) -> None:
    # the mask is checked even when no average is computed (0.5 is not "keep")
    with pytest.raises(ValueError, match="attention_mask"):
        features_pool(torch.randn(2, 3, 4), mode, torch.full((2, 3), 0.5))


@pytest.mark.parametrize("mode", ["avg", "avgmax"])
def test_half_precision_averages_accumulate_in_float32_in_heads_and_features(mode: str) -> None:
    # 4096 equal values of 1 + 2**-10 (exact in float16): a float16 running sum would
    # stall at 2048, far from the float32 answer
    x = torch.full((2, 3, 64, 64), 1.0 + 2**-10, dtype=torch.float16)
    x[:, :, 0, 0] = 0
    exact = torch.tensor((4095 * (1.0 + 2**-10)) / 4096, dtype=torch.float32)
    from_features = features_pool(x, mode)[:, :3]
    torch.testing.assert_close(from_features, exact.expand(2, 3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head_pool(x, mode)[:, :3], exact.half().expand(2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert features_pool(x.bfloat16(), mode).dtype == torch.float32


@given(
    n=st.integers(1, 4),
    t=st.integers(1, 6),
    d=st.integers(1, 5),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_pooling_agrees_between_heads_and_features_on_any_token_shape(
    n: int, t: int, d: int, mode: str, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=generator)
    mask = (torch.rand(n, t, generator=generator) > 0.4).long()
    mask = None if mode == "token" else mask
    from_head, from_features = head_pool(x, mode, mask), features_pool(x, mode, mask)
    assert from_head.shape == (n, 2 * d if mode == "avgmax" else d)
    assert torch.equal(from_head, from_features)
    mask_np = None if mask is None else mask.numpy()
    np.testing.assert_allclose(
        from_head.double().numpy(), numpy_pool(x.numpy(), mode, mask_np), atol=1e-5
    )


def test_token_pooling_of_a_head_checks_the_mask_and_rejects_left_padding() -> None:
    # failed before the fix: the head dropped the mask for "token", so a left-padded batch
    # was classified from its padding token, and a mask of the wrong shape went unchecked
    torch.manual_seed(3)
    head = tk.ClassifierHead(4, 2, hidden=(), dropout=0.0, pool="token")
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"attention_mask: .*first token.*padding.*rows \[0\]"):
        head(x, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        head(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        head(x, attention_mask=torch.full((2, 3), 0.5))
    # right padding: the first token is real and the mask changes nothing
    right = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(head(x, attention_mask=right), head(x))
    torch.testing.assert_close(head.pool(x, right.bool()), x[:, 0])


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_a_row_without_real_tokens_pools_to_zeros_in_heads(mode: str) -> None:
    """Guard: an all-padding row gives zeros (not NaN from 0/0, not -inf from the max)."""
    x = torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    pooled = head_pool(x, mode, mask)
    assert torch.isfinite(pooled).all()
    assert torch.equal(pooled[1], torch.zeros_like(pooled[1]))
    np.testing.assert_allclose(
        pooled.numpy(), numpy_pool(x.numpy(), mode, mask.numpy()), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_head_pools_channels_last_maps_like_contiguous_ones(mode: str) -> None:
    """Guard: a channels-last map (strides N, 1, W*C, C) pools over H, W, not over C."""
    x = torch.randn(2, 6, 4, 5)
    last = x.to(memory_format=torch.channels_last)
    assert not last.is_contiguous()
    torch.testing.assert_close(head_pool(last, mode), head_pool(x, mode))
    np.testing.assert_allclose(
        head_pool(last, mode).numpy(), numpy_pool(x.numpy(), mode), rtol=1e-6
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 0, 6), (2, 6, 0, 3)], ids=["no tokens", "empty map"])
def test_empty_sequences_and_maps_raise_instead_of_pooling_to_nan(
    mode: str, shape: tuple[int, ...]
) -> None:
    # failed before the fix: "avg" of an (N, 0, D) sequence or an (N, C, 0, W) map was NaN
    # in heads and features alike, silently ("max" and "token" raised IndexError)
    if mode == "token" and len(shape) == 4:
        pytest.skip("token pooling of a map is an error anyway")
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match="input: nothing to pool"):
        head_pool(x, mode)
    with pytest.raises(ValueError, match="layer 'output': nothing to pool"):
        features_pool(x, mode)

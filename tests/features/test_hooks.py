"""`FeatureExtractor`: layer capture (no hook outlives a call) and pooling (features/_hooks.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import transferkit as tk
from tests.features._helpers import (
    POOLS,
    TokenNet,
    TupleNet,
    hook_count,
    images,
    in_two_threads,
    numpy_pool,
    small_cnn,
)
from transferkit.features import masked_mean


def test_layers_equal_a_manual_forward_that_captures_them() -> None:
    net, x = small_cnn(), images()
    with torch.no_grad():
        conv = net.features[0](x)
        bn = net.features[1](conv)  # before the in-place ReLU modifies it
        feats = net.features(x)
        neck = net.neck(feats)
        logits = net.fc(neck)
    layers = ["features.1", "features", "neck", "fc"]
    with torch.no_grad(), tk.FeatureExtractor(net, layers, pool=None) as extractor:
        out = extractor(x)
    assert list(out) == layers
    for name, expected in zip(layers, [bn, feats, neck, logits], strict=True):
        torch.testing.assert_close(out[name], expected)


def test_output_order_follows_the_request_not_the_network() -> None:
    net = small_cnn()
    out = tk.FeatureExtractor(net, ["fc", "features", "neck"])(images(4))
    assert list(out) == ["fc", "features", "neck"]
    assert out["features"].shape == (4, 16)


def test_single_name_returns_a_tensor_and_none_returns_the_model_output() -> None:
    net, x = small_cnn(), images(5)
    with torch.no_grad():
        assert isinstance(tk.FeatureExtractor(net, "neck")(x), Tensor)
        torch.testing.assert_close(tk.FeatureExtractor(net)(x), net(x))
        one = tk.FeatureExtractor(net, ["neck"])(x)
    assert isinstance(one, dict) and list(one) == ["neck"]


def test_tuple_and_mapping_outputs_contribute_their_first_tensor() -> None:
    torch.manual_seed(0)
    net, x = TupleNet(), torch.randn(6, 4)
    with torch.no_grad():
        block = tk.FeatureExtractor(net, "block")(x)
        whole = tk.FeatureExtractor(net)(x)
        torch.testing.assert_close(block, net.block.linear(x))
        torch.testing.assert_close(whole, net(x)["logits"])


def test_captured_maps_are_copies_safe_from_inplace_ops() -> None:
    net, x = small_cnn(), images(3)
    with torch.no_grad():
        out = tk.FeatureExtractor(net, "features.1", pool=None)(x)
    assert (out < 0).any()  # the in-place ReLU that follows did not touch the copy


def test_hooks_are_gone_after_a_normal_call_and_after_close() -> None:
    net = small_cnn()
    seen: list[int] = []
    net.fc.register_forward_pre_hook(lambda module, args: seen.append(hook_count(net)))
    extractor = tk.FeatureExtractor(net, ["features", "neck"])
    extractor(images(2))
    assert seen == [3]  # ours (2) + the pre-hook, attached while the forward ran
    assert hook_count(net) == 1
    extractor.close()
    assert hook_count(net) == 1
    with pytest.raises(RuntimeError, match="closed"):
        extractor(images(2))


def test_hooks_are_removed_when_the_forward_raises() -> None:
    net = small_cnn()
    with tk.FeatureExtractor(net, ["features", "neck"]) as extractor:
        with pytest.raises(RuntimeError):
            extractor(torch.zeros(2, 3, 16, 16))  # wrong channel count
        assert hook_count(net) == 0
        extractor(images(2))  # still usable after the failure
    assert hook_count(net) == 0


def test_extractor_does_not_change_the_users_model() -> None:
    net = small_cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        tk.FeatureExtractor(net, ["features.4", "neck"], early_stop=True)(images(4))
    net.train()  # extract_features switches to eval: BatchNorm statistics must not move
    tk.extract_features(net, images(8), layers="neck", batch_size=3, progress=False)
    assert net.training and all(m.training for m in net.modules())
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert hook_count(net) == 0


def test_early_stop_skips_the_rest_of_the_network_with_the_same_outputs() -> None:
    net, x = small_cnn(), images(4)
    fc_calls: list[int] = []
    net.fc.register_forward_pre_hook(lambda module, args: fc_calls.append(1))
    full = tk.FeatureExtractor(net, ["features", "neck.1"])
    early = tk.FeatureExtractor(net, ["features", "neck.1"], early_stop=True)
    with torch.no_grad():
        reference = full(x)
        calls_before = len(fc_calls)
        first = early(x)  # learns how many layer calls one pass makes
        second = early(x)  # stops after neck.1
    assert len(fc_calls) == calls_before + 1
    for out in (first, second):
        for name in reference:
            torch.testing.assert_close(out[name], reference[name])
    assert hook_count(net) == 1


def test_unknown_layer_names_raise_with_close_matches() -> None:
    net = small_cnn()
    with pytest.raises(ValueError, match=r"'featurez' is not a module of SmallCNN.*'features'"):
        tk.FeatureExtractor(net, ["featurez"])
    with pytest.raises(ValueError, match="top-level modules are 'features', 'neck', 'fc'"):
        tk.FeatureExtractor(net, "transformer")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"layers": []}, ValueError),
        ({"layers": ["neck", "neck"]}, ValueError),
        ({"layers": [3]}, TypeError),
        ({"layers": 3}, TypeError),
        ({"pool": "mean"}, ValueError),
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="layers|pool"):
        tk.FeatureExtractor(small_cnn(), **kwargs)


def test_a_layer_that_never_runs_is_reported() -> None:
    net = small_cnn()
    net.unused = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="did not run"):
        tk.FeatureExtractor(net, ["neck", "unused"])(images(2))
    assert hook_count(net) == 0


def test_one_extractor_called_from_two_threads_gives_the_serial_results() -> None:
    net = small_cnn()
    extractor = tk.FeatureExtractor(net, ["features", "neck"])
    inputs = [images(6, seed=s) for s in range(2)]
    with torch.no_grad():
        serial = [extractor(x) for x in inputs]

    def call(i: int) -> dict[str, Tensor]:
        with torch.no_grad():
            out: dict[str, Tensor] = extractor(inputs[i])
        return out

    results = in_two_threads(call, repeats=40)
    for i in range(2):
        for out in results[i]:
            for name in serial[i]:
                assert torch.equal(out[name], serial[i][name])
    assert hook_count(net) == 0


def test_an_extractor_survives_deepcopy_with_its_lock() -> None:
    import copy

    extractor = tk.FeatureExtractor(small_cnn(), "neck")
    clone = copy.deepcopy(extractor)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(clone(x), extractor(x))


# --------------------------------------------------------------------------- pooling


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

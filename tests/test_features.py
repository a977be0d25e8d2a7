from __future__ import annotations

import json
import logging
import math
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
from transferkit.features import masked_mean

POOLS: list[Any] = ["avg", "max", "avgmax", None]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def small_cnn(seed: int = 0) -> tk.models.SmallCNN:
    torch.manual_seed(seed)
    net = tk.models.SmallCNN(num_classes=10, width=8, feature_dim=16)
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def images(n: int = 12, seed: int = 0) -> Tensor:
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def numpy_pool(x: np.ndarray, mode: str | None) -> np.ndarray:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    if mode is None:
        return x
    if mode == "avg":
        return flat.mean(axis=2)
    if mode == "max":
        return flat.max(axis=2)
    return np.concatenate([flat.mean(axis=2), flat.max(axis=2)], axis=1)


class Counting(nn.Module):
    """Counts forward calls; raises on call number ``fail_at`` (simulated interruption)."""

    def __init__(self, net: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        out: Tensor = self.net(x)
        return out


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, str]:
        return self.linear(x), "extra"


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleBlock()
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hidden, _ = self.block(x)
        return {"logits": self.out(hidden), "hidden": hidden}


class TokenNet(nn.Module):
    """Returns token sequences (N, T, D) like a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.mix = nn.Linear(5, 5)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out: Tensor = self.mix(torch.tanh(self.embed(x)))
        return out


# --------------------------------------------------------------------------- extractor


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


@pytest.mark.parametrize("pool", POOLS)
def test_pooling_of_feature_maps_matches_numpy(pool: Any) -> None:
    net, x = small_cnn(), images()
    with torch.no_grad():
        maps = net.features[1](net.features[0](x)).numpy()
        out = tk.FeatureExtractor(net, "features.1", pool=pool)(x)
    np.testing.assert_allclose(out.numpy(), numpy_pool(maps, pool), rtol=1e-5, atol=1e-6)


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


# --------------------------------------------------------------------------- masked_mean


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


# --------------------------------------------------------------------------- extract_features


def test_extract_features_equals_the_extractor_on_all_data_kinds() -> None:
    net, x = small_cnn(), images(23)
    y = torch.arange(23) % 4
    with torch.no_grad():
        expected = tk.FeatureExtractor(net, ["features", "neck"])(x)
    kinds: list[Any] = [
        x,
        x.numpy().astype(np.float64),  # float64 arrays are cast to the model's dtype
        TensorDataset(x),
        DataLoader(TensorDataset(x), batch_size=5),
    ]
    for data in kinds:
        out = tk.extract_features(
            net, data, layers=["features", "neck"], batch_size=7, progress=False
        )
        assert list(out) == ["features", "neck"]
        for name in out:
            assert isinstance(out[name], np.ndarray) and out[name].dtype == np.float32
            np.testing.assert_allclose(out[name], expected[name].numpy(), rtol=1e-5, atol=1e-6)
    feats, labels = tk.extract_features(
        net, DataLoader(TensorDataset(x, y), batch_size=4), layers="neck", progress=False
    )
    np.testing.assert_allclose(feats, expected["neck"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, y.numpy())


def test_extract_features_accepts_dict_batches_and_takes_labels_out() -> None:
    class Dicts(Dataset[dict[str, Tensor]]):
        def __init__(self) -> None:
            self.x = torch.randn(10, 7, 3)
            self.mask = (torch.arange(7)[None] < torch.randint(1, 8, (10, 1))).long()

        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {"x": self.x[i], "attention_mask": self.mask[i], "labels": torch.tensor(i)}

    torch.manual_seed(0)
    net, data = TokenNet(), Dicts()
    feats, labels = tk.extract_features(net, data, batch_size=4, progress=False)
    with torch.no_grad():
        expected = masked_mean(net(data.x), data.mask)
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, np.arange(10))
    plain = tk.extract_features(
        net, {"x": data.x, "attention_mask": data.mask}, batch_size=3, progress=False
    )
    np.testing.assert_allclose(plain, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_extract_features_runs_in_eval_and_inference_mode_and_restores_modes() -> None:
    states: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            states.append((self.training, torch.is_inference_mode_enabled()))
            return x.flatten(1)

    net = nn.Sequential(nn.Dropout(0.9), Probe()).train()
    net[0].eval()  # a module the user froze in eval mode stays so afterwards
    x = torch.ones(6, 2)
    out = tk.extract_features(net, x, batch_size=4, progress=False)
    np.testing.assert_array_equal(out, np.ones((6, 2), np.float32))  # dropout was off
    assert states == [(False, True), (False, True)]
    assert net.training and net[1].training and not net[0].training


BATCH_NET, BATCH_X = small_cnn(), images(17)
BATCH_REFERENCE = tk.extract_features(
    BATCH_NET, BATCH_X, layers="neck", batch_size=17, progress=False
)


@settings(max_examples=12)
@given(batch_size=st.integers(1, 20))
def test_batch_size_does_not_change_the_features(batch_size: int) -> None:
    net, x, reference = BATCH_NET, BATCH_X, BATCH_REFERENCE
    out = tk.extract_features(net, x, layers="neck", batch_size=batch_size, progress=False)
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_gives_float32_features_close_to_full_precision() -> None:
    net, x = small_cnn(), images(16)
    full = tk.extract_features(net, x, layers="neck", progress=False)
    half = tk.extract_features(net, x, layers="neck", amp=torch.bfloat16, progress=False)
    assert half.dtype == np.float32
    assert np.abs(half - full).max() <= 0.05 * np.abs(full).max()


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


# --------------------------------------------------------------------------- cache


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


def test_a_changed_model_or_data_invalidates_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = images(20)
    old = tk.extract_features(small_cnn(0), x, layers="neck", cache=tmp_path, progress=False)
    changed = Counting(small_cnn(0))
    with torch.no_grad():
        changed.net.fc.weight[0, 0] += 1.0  # a layer after the one extracted still counts
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        tk.extract_features(changed, x, layers="net.neck", cache=tmp_path, progress=False)
    assert changed.calls > 0 and "different" in caplog.text
    new_net = Counting(small_cnn(1))
    new = tk.extract_features(new_net, x, layers="net.neck", cache=tmp_path, progress=False)
    assert new_net.calls > 0 and not np.allclose(new, old)
    again = Counting(small_cnn(1))
    tk.extract_features(again, x + 1.0, layers="net.neck", cache=tmp_path, progress=False)
    assert again.calls > 0


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


def test_progress_bar_is_shown_and_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    tk.extract_features(small_cnn(), images(4), progress=True)
    assert "extract_features" in capsys.readouterr().err
    tk.extract_features(small_cnn(), images(4), progress=False)
    assert capsys.readouterr().err == ""


def test_iterable_datasets_of_unknown_length_work_but_cannot_be_cached(tmp_path: Path) -> None:
    class Stream(torch.utils.data.IterableDataset[Tensor]):
        def __iter__(self) -> Any:
            return iter(images(10))

    net = small_cnn()
    out = tk.extract_features(
        net, DataLoader(Stream(), batch_size=4), layers="neck", progress=False
    )
    expected = tk.extract_features(net, images(10), layers="neck", progress=False)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cache: needs a DataLoader over a map-style Dataset"):
        tk.extract_features(net, DataLoader(Stream(), batch_size=4), cache=tmp_path, progress=False)

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
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


class Probe:
    """Call count and failure point of a test module, kept out of the cache key: module
    attributes are fingerprinted by value, a plain object by its ``repr`` (which does not
    show them)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at


class Counting(nn.Module):
    """Counts forward calls; raises on call number ``fail_at`` (simulated interruption)."""

    def __init__(self, net: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.probe = Probe(fail_at)

    @property
    def calls(self) -> int:
        return self.probe.calls

    def forward(self, x: Tensor) -> Tensor:
        self.probe.calls += 1
        if self.probe.fail_at is not None and self.probe.calls == self.probe.fail_at:
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


# --------------------------------------------------------------------------- cache: trust


def cache_once(folder: Path, n: int = 40) -> tuple[tk.models.SmallCNN, Tensor, np.ndarray]:
    net, x = small_cnn(), images(n)
    out = tk.extract_features(net, x, layers="neck", batch_size=16, cache=folder, progress=False)
    return net, x, np.array(out)


def point_header_at(folder: Path, name: str) -> None:
    header = json.loads((folder / "header.json").read_text())
    header["files"]["neck"]["file"] = name
    (folder / "header.json").write_text(json.dumps(header))


@pytest.mark.parametrize("kind", ["parent", "absolute", "subfolder", "dotdot-inside", "dot"])
@pytest.mark.parametrize("model", ["same", "changed"])
def test_a_header_naming_a_file_outside_the_cache_is_refused_and_never_touched(
    tmp_path: Path, kind: str, model: str
) -> None:
    folder = tmp_path / "cache"
    net, x, _ = cache_once(folder)
    victim = tmp_path / "victim.npy"  # what an attacker or a bug points the header at
    np.save(victim, np.arange(5.0))
    before = victim.read_bytes()
    (folder / "sub").mkdir()
    name = {
        "parent": "../victim.npy",
        "absolute": str(victim),
        "subfolder": "sub/features_0.npy",
        "dotdot-inside": "features_0.npy/../../victim.npy",
        "dot": ".",
    }[kind]
    point_header_at(folder, name)
    if model == "changed":  # a changed model makes the cache delete the old files
        with torch.no_grad():
            net.fc.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"cache: .*plain file name.*Refusing to touch it"):
        tk.extract_features(net, x, layers="neck", batch_size=16, cache=folder, progress=False)
    assert victim.read_bytes() == before
    assert (folder / "features_0.npy").exists()  # nothing deleted either


@pytest.mark.parametrize("state", ["complete", "interrupted", "changed-model"])
def test_a_symbolic_link_in_the_cache_is_never_followed(tmp_path: Path, state: str) -> None:
    folder = tmp_path / "cache"
    net, x, _ = cache_once(folder)
    victim = tmp_path / "victim.npy"  # a valid copy, so following the link would "work"
    (folder / "features_0.npy").rename(victim)
    (folder / "features_0.npy").symlink_to(victim)
    if state == "interrupted":  # a resume would write through the link
        header = json.loads((folder / "header.json").read_text())
        header["complete"], header["chunks"] = False, header["chunks"][:1]
        (folder / "header.json").write_text(json.dumps(header))
    if state == "changed-model":
        with torch.no_grad():
            net.fc.weight.add_(1.0)
    before = victim.read_bytes()
    with pytest.raises(ValueError, match=r"symbolic link.*never follows links"):
        tk.extract_features(net, x, layers="neck", batch_size=16, cache=folder, progress=False)
    assert victim.read_bytes() == before and (folder / "features_0.npy").is_symlink()


class Rows(Dataset[tuple[Tensor, Tensor]]):
    """A mutable map-style Dataset (the user edits an item between two runs)."""

    def __init__(self, x: Tensor) -> None:
        self.x = x.clone()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], torch.tensor(index)


def test_swapping_two_rows_of_a_tensor_recomputes(tmp_path: Path) -> None:
    net, x = small_cnn(), images(200)
    tk.extract_features(net, x, layers="neck", batch_size=64, cache=tmp_path, progress=False)
    swapped = x.clone()
    swapped[[1, 2]] = x[[2, 1]]  # same sum, not among evenly spaced samples
    got = tk.extract_features(
        net, swapped, layers="neck", batch_size=64, cache=tmp_path, progress=False
    )
    fresh = tk.extract_features(net, swapped, layers="neck", batch_size=64, progress=False)
    np.testing.assert_array_equal(got, fresh)
    assert not np.array_equal(got[1], got[2])


def test_changing_item_100_of_a_dataset_recomputes_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net, data = Counting(small_cnn()), Rows(images(1000))
    kwargs: dict[str, Any] = {"layers": "net.neck", "batch_size": 64, "progress": False}
    tk.extract_features(net, data, cache=tmp_path, **kwargs)
    calls = net.calls
    tk.extract_features(net, data, cache=tmp_path, **kwargs)
    assert net.calls == calls  # unchanged data: nothing recomputed
    data.x[100] += 1.0
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        got, _ = tk.extract_features(net, data, cache=tmp_path, **kwargs)
    assert net.calls == calls + 1  # only the batch holding item 100 (rows 64..128)
    assert "changed since they were cached" in caplog.text and "rows 64..128" in caplog.text
    fresh, _ = tk.extract_features(net, data, **kwargs)
    np.testing.assert_array_equal(got, fresh)


class Act(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = activation
        self.register_buffer("scale", torch.ones(4), persistent=False)
        self.factor = 2.0  # plain attributes: in neither the state_dict nor the repr
        self.offset = torch.zeros(4)
        self.options = {"shift": [0.0]}

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.lin(x)) * self.scale * self.factor + self.offset
        return out + self.options["shift"][0]


CHANGES = [
    "relu->tanh",
    "non-persistent buffer",
    "float attribute",
    "tensor attribute",
    "nested attribute",
]


@pytest.mark.parametrize("change", CHANGES)
def test_a_model_change_without_parameter_change_recomputes(tmp_path: Path, change: str) -> None:
    torch.manual_seed(0)
    net, x = Act(nn.ReLU()), torch.randn(30, 4)
    tk.extract_features(net, x, cache=tmp_path, progress=False)
    if change == "relu->tanh":
        net.act = nn.Tanh()  # same state_dict
    elif change == "non-persistent buffer":
        net.scale.fill_(2.0)  # not in state_dict
    elif change == "float attribute":
        net.factor = 3.0
    elif change == "tensor attribute":
        net.offset[1] = 1.0
    else:
        net.options["shift"][0] = 1.0
    got = tk.extract_features(net, x, cache=tmp_path, progress=False)
    np.testing.assert_array_equal(got, tk.extract_features(net, x, progress=False))


def test_the_same_data_in_another_memory_layout_reuses_the_cache(tmp_path: Path) -> None:
    net, x = Counting(small_cnn()), images(30)
    first = tk.extract_features(net, x, batch_size=8, cache=tmp_path, progress=False)
    calls = net.calls
    strided = x.contiguous(memory_format=torch.channels_last)
    again = tk.extract_features(net, strided, batch_size=8, cache=tmp_path, progress=False)
    assert net.calls == calls
    np.testing.assert_array_equal(again, first)


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


def test_stale_temp_files_of_a_killed_run_are_removed_and_nothing_else(tmp_path: Path) -> None:
    ours = [".features_0.npy.4242.tmp", ".header.json.17.tmp", ".labels.npy.99.tmp"]
    ours += [".features_0.npy.4242.3.tmp", ".header.json.17.0.tmp"]  # the atomic writer's
    others = ["notes.tmp", ".other.1.tmp", "features_0.npy.bak", ".features_0.npy.x.tmp"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    cache_once(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".lock", "features_0.npy", "header.json", *others])


class TrainsBatchNorm(nn.Module):
    """Its train() keeps BatchNorm in training mode, as some 'freeze' recipes do wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def train(self, mode: bool = True) -> TrainsBatchNorm:
        super().train(mode)
        self.bn.train()
        return self

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.bn(self.conv(x))
        return out


def test_batchnorm_statistics_are_never_updated_by_extraction() -> None:
    net = TrainsBatchNorm().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tk.extract_features(net, images(8), batch_size=4, progress=False)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert net.training and net.bn.training


def snapshot(model: nn.Module) -> dict[str, tuple[Tensor, torch.device, torch.dtype, bool]]:
    """Every parameter and buffer (value, device, dtype) and every module's mode."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    state = {k: (v.detach().clone(), v.device, v.dtype, False) for k, v in tensors}
    cpu, empty = torch.device("cpu"), torch.empty(0)
    for name, module in model.named_modules():
        state[f"mode:{name}"] = (empty, cpu, torch.float32, module.training)
    return state


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, (value, device, dtype, mode) in before.items():
        got = after[key]
        assert got[1] == device and got[2] == dtype and got[3] == mode, key
        assert torch.equal(got[0], value), key


class FailsToMove(nn.Module):
    """Raises while being moved, after its siblings moved (like an OOM half-way)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))

    def _apply(self, fn: Any, recurse: bool = True) -> FailsToMove:
        raise torch.OutOfMemoryError("simulated out of memory while moving")


class BadBatch(Dataset[Tensor]):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> Tensor:
        if index == 9:
            raise OSError("unreadable image")
        return images(1, seed=index)[0]


@pytest.mark.parametrize("failure", ["meta", "oom-during-move", "bad-batch", "forward"])
def test_a_failed_extraction_leaves_the_model_exactly_as_it_was(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    net: nn.Module = small_cnn().double()
    net.train()
    net.fc.eval()  # per-submodule modes must come back too
    net.features[0].weight.grad = torch.ones_like(net.features[0].weight)
    assert isinstance(net.features[0].weight.grad, Tensor)
    data: Any = images(12).double()
    device = "auto"
    if failure == "meta":
        device = "meta"
    elif failure == "oom-during-move":
        net.add_module("late", FailsToMove())
        monkeypatch.setattr(tk.features, "_same_device", lambda a, b: False)  # force a move
        monkeypatch.setattr(tk.features, "_check_not_meta", lambda model, device: None)
        device = "meta"  # the move itself loses the data of every module moved before "late"
    elif failure == "bad-batch":
        data = BadBatch()
    else:
        net = Counting(net, fail_at=2)
    before = snapshot(net)
    with pytest.raises((RuntimeError, NotImplementedError, OSError, ValueError)) as raised:
        tk.extract_features(net, data, batch_size=4, device=device, progress=False)
    if failure == "meta":
        assert "device: 'meta' holds no data" in str(raised.value)
    assert_unchanged(net, before)
    monkeypatch.undo()
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and bool((first.weight.grad == 1).all())
    assert first.weight.grad.device.type == "cpu"
    out = tk.extract_features(net, images(4).double(), progress=False)  # still usable
    assert np.isfinite(out).all()


def test_one_extractor_called_from_two_threads_gives_the_serial_results() -> None:
    import threading

    net = small_cnn()
    extractor = tk.FeatureExtractor(net, ["features", "neck"])
    inputs = [images(6, seed=s) for s in range(2)]
    with torch.no_grad():
        serial = [extractor(x) for x in inputs]
    results: list[list[dict[str, Tensor]]] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(40):
                    results[i].append(extractor(inputs[i]))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(2):
        for out in results[i]:
            for name in serial[i]:
                assert torch.equal(out[name], serial[i][name])
    assert hook_count(net) == 0


def test_extract_features_on_one_model_from_two_threads_gives_the_serial_results(
    tmp_path: Path,
) -> None:
    import threading

    net = small_cnn().train()
    inputs = [images(20, seed=s) for s in range(2)]
    serial = [tk.extract_features(net, x, batch_size=4, progress=False) for x in inputs]
    results: list[list[np.ndarray]] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(10):
                results[i].append(tk.extract_features(net, inputs[i], batch_size=4, progress=False))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(2):
        for out in results[i]:
            np.testing.assert_array_equal(out, serial[i])
    assert all(m.training for m in net.modules())


def test_an_extractor_survives_deepcopy_with_its_lock() -> None:
    import copy

    extractor = tk.FeatureExtractor(small_cnn(), "neck")
    clone = copy.deepcopy(extractor)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(clone(x), extractor(x))


@settings(max_examples=40)
@given(
    payload=st.binary(min_size=0, max_size=700),
    cuts=st.lists(st.integers(0, 700), max_size=6),
    threads=st.booleans(),
)
def test_the_tree_hash_depends_only_on_the_bytes(
    payload: bytes, cuts: list[int], threads: bool
) -> None:
    from transferkit import _feature_cache as fc

    saved_leaf, saved_pool = fc._LEAF_BYTES, fc._hash_pool
    fc._LEAF_BYTES = 64  # many leaves from a small payload
    if not threads:
        fc._hash_pool = lambda: None  # type: ignore[assignment]
    try:
        whole = fc._TreeHash()
        whole.update(payload)
        pieces = fc._TreeHash()
        bounds = sorted({0, len(payload), *(c for c in cuts if c <= len(payload))})
        for a, b in itertools.pairwise(bounds):
            pieces.update(payload[a:b])
        assert pieces.hexdigest() == whole.hexdigest()
        reference = hashlib.blake2b(digest_size=16)
        for i in range(0, len(payload) - len(payload) % 64, 64):
            reference.update(hashlib.blake2b(payload[i : i + 64], digest_size=32).digest())
        if len(payload) % 64:
            tail = payload[len(payload) - len(payload) % 64 :]
            reference.update(hashlib.blake2b(tail, digest_size=32).digest())
        reference.update(len(payload).to_bytes(8, "little"))
        assert whole.hexdigest() == reference.hexdigest()  # an independent re-derivation
    finally:
        fc._LEAF_BYTES, fc._hash_pool = saved_leaf, saved_pool


@settings(max_examples=40)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]),
    seed=st.integers(0, 2**16),
)
def test_a_tensor_digest_ignores_memory_layout_but_sees_every_element(
    shape: list[int], dtype: torch.dtype, seed: int
) -> None:
    from transferkit import _feature_cache as fc

    def digest(t: Tensor) -> str:
        h = fc._TreeHash()
        fc._update_tensor(h, t)
        return h.hexdigest()

    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 100).to(dtype)
    order = torch.randperm(len(shape), generator=g).tolist()
    strided = (
        base.permute(order).contiguous().permute(sorted(range(len(shape)), key=order.__getitem__))
    )
    assert torch.equal(strided, base)
    assert digest(strided) == digest(base) == digest(base.clone())
    flat = base.reshape(-1)
    if flat.numel() > 1 and not torch.equal(flat[0], flat[-1]):
        changed = base.clone().reshape(-1)
        changed[[0, -1]] = flat[[-1, 0]]  # swap two different elements
        assert digest(changed.reshape(shape)) != digest(base)
    assert digest(base.to(torch.float16 if dtype != torch.float16 else torch.float32)) != digest(
        base
    )


def test_hashing_still_works_in_a_forked_child() -> None:
    import multiprocessing

    from transferkit import _feature_cache as fc

    big = np.arange(3 * fc._LEAF_BYTES // 8, dtype=np.int64)  # several leaves: uses the pool
    parent = fc._TreeHash()
    parent.update(big)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:  # the child inherits the pool object without its threads
        child = pool.apply_async(_digest_in_child, (big,)).get(timeout=20)
    assert child == parent.hexdigest()


def _digest_in_child(array: np.ndarray) -> str:
    from transferkit import _feature_cache as fc

    h = fc._TreeHash()
    h.update(array)
    return h.hexdigest()


def test_a_model_on_the_meta_device_is_refused_clearly() -> None:
    with torch.device("meta"):
        net = tk.models.SmallCNN()
    with pytest.raises(ValueError, match=r"model: .* is on the meta device.*to_empty"):
        tk.extract_features(net, images(2), progress=False)


class NamedItems(Dataset[tuple[Tensor, str]]):
    """Items whose labels are strings that grow longer with the index."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return torch.full((4,), float(index)), "c" * (index + 1)


def test_string_labels_longer_than_the_first_batch_are_never_truncated(tmp_path: Path) -> None:
    net = nn.Linear(4, 3)
    _, labels = tk.extract_features(net, NamedItems(), batch_size=3, progress=False)
    assert labels.tolist() == ["c" * (i + 1) for i in range(10)]
    with pytest.raises(ValueError, match=r"labels: rows 3\.\.6 have dtype <U6.*<U3"):
        tk.extract_features(net, NamedItems(), batch_size=3, cache=tmp_path, progress=False)


class Reshaping(nn.Module):
    """Per-sample output shape (3, 2) for batches starting with a zero, else ``later``."""

    def __init__(self, later: tuple[int, int]) -> None:
        super().__init__()
        self.later = later

    def forward(self, x: Tensor) -> Tensor:
        shape = (3, 2) if bool(x[0, 0] == 0) else self.later
        return x[:, : shape[0] * shape[1]].reshape(len(x), *shape)


@pytest.mark.parametrize(("later", "cache"), [((1, 2), False), ((2, 3), True)])
def test_a_batch_with_another_output_shape_raises_instead_of_broadcasting(
    tmp_path: Path, later: tuple[int, int], cache: bool
) -> None:
    # (1, 2) rows would broadcast into (3, 2) storage; (2, 3) rows have the same bytes
    x = torch.ones(6, 6)
    x[:3] = 0.0
    with pytest.raises(ValueError, match=r"layers: 'output': rows 3\.\.6 have shape"):
        tk.extract_features(
            Reshaping(later),
            x,
            batch_size=3,
            pool=None,
            cache=tmp_path if cache else None,
            progress=False,
        )


class CountsInBuffer(nn.Module):
    """Updates its buffers in place at every forward, even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("average", torch.zeros(3), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.lin(x)
        self.calls += 1
        self.average.mul_(0.9).add_(0.1 * out.mean(0))
        return out


@pytest.mark.parametrize("cache", [False, True])
def test_buffers_updated_in_place_by_forward_are_left_as_they_were(
    tmp_path: Path, cache: bool
) -> None:
    torch.manual_seed(0)
    net, x = CountsInBuffer(), torch.randn(20, 4)
    calls, average = net.calls, net.average
    tk.extract_features(net, x, batch_size=8, cache=tmp_path if cache else None, progress=False)
    assert net.calls is calls and net.average is average
    assert int(net.calls) == 0 and not net.average.any()


@pytest.mark.parametrize("found", ["labels.npy", "features_0.npy", "header.json"])
def test_a_folder_holding_other_files_of_those_names_is_left_alone(
    tmp_path: Path, found: str
) -> None:
    mine = tmp_path / found
    if found == "header.json":
        mine.write_text('{"project": "mine"}')
    else:
        np.save(mine, np.arange(5))
    before = mine.read_bytes()
    data = TensorDataset(images(10), torch.arange(10))
    with pytest.raises(ValueError, match="is not part of a transferkit feature cache"):
        tk.extract_features(small_cnn(), data, layers="neck", cache=tmp_path, progress=False)
    assert mine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".lock", found])


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


def test_a_run_killed_while_updating_a_complete_cache_resumes_without_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net, x = small_cnn(), images(12)
    kwargs: dict[str, Any] = {"layers": "neck", "batch_size": 4, "progress": False}
    reference = tk.extract_features(net, x, cache=tmp_path, **kwargs).copy()
    changed = x.clone()
    changed[0] += 1.0
    # Killed right after the changed chunk's rows were written: no header save after them.
    monkeypatch.setattr(tk.features._CacheSink, "save", lambda self, complete=False: None)
    tk.extract_features(net, changed, cache=tmp_path, **kwargs)
    monkeypatch.undo()
    # The header still has the old chunk, whose rows on disk are now the changed ones.
    got = tk.extract_features(net, x, cache=tmp_path, **kwargs)
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


@pytest.mark.parametrize("as_dict", [False, True])
def test_sparse_data_is_refused_by_name(as_dict: bool) -> None:
    sparse = torch.eye(4).to_sparse()
    data: Any = {"x": sparse} if as_dict else sparse
    with pytest.raises(TypeError, match=r"data(\['x'\])?: expected a dense tensor"):
        tk.extract_features(nn.Identity(), data, progress=False)


def test_a_model_with_uninitialised_lazy_modules_is_refused_and_left_intact() -> None:
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.LazyLinear(3), nn.ReLU()), torch.randn(5, 4)
    with pytest.raises(ValueError, match="model: '0.weight' .* uninitialised lazy parameter"):
        tk.extract_features(net, x, progress=False)
    assert isinstance(net[0], nn.LazyLinear)
    net(x).sum().backward()  # still initialises and trains normally
    assert net[0].weight.shape == (3, 4)
    assert tk.extract_features(net, x, progress=False).shape == (5, 3)


@dataclasses.dataclass
class Inputs:
    x: Tensor


@dataclasses.dataclass(slots=True, frozen=True)
class SlotInputs:
    x: Tensor


class SumOfInputs(nn.Module):
    def forward(self, inputs: Any) -> Tensor:
        return inputs.x.sum(1, keepdim=True)


@pytest.mark.parametrize("wrap", [Inputs, SlotInputs])
def test_batches_of_objects_are_hashed_by_every_value_not_by_repr(
    tmp_path: Path, wrap: Any
) -> None:
    def loader(data: Tensor) -> DataLoader[Any]:
        return DataLoader(
            range(4),  # type: ignore[arg-type]
            batch_size=2,
            collate_fn=lambda index: (wrap(data[index]), torch.tensor(index)),
        )

    x = torch.zeros(4, 2000)  # repr(x) shows only the first and last values
    changed = x.clone()
    changed[:, 1000] = 5.0
    tk.extract_features(SumOfInputs(), loader(x), cache=tmp_path, progress=False)
    got, _ = tk.extract_features(SumOfInputs(), loader(changed), cache=tmp_path, progress=False)
    np.testing.assert_array_equal(got, np.full((4, 1), 5.0, dtype=np.float32))


Pair = collections.namedtuple("Pair", ["x", "scale"])


class DoubleNet(nn.Module):
    """A float64 model that takes a dataclass or a namedtuple of inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, inputs: Any, scale: Tensor | None = None) -> Tensor:
        out: Tensor = self.lin(inputs if scale is not None else inputs.x)
        return out * scale[:, None] if scale is not None else out


@pytest.mark.parametrize("kind", ["dataclass", "namedtuple"])
def test_tensors_inside_dataclass_and_namedtuple_batches_take_the_model_dtype(kind: str) -> None:
    torch.manual_seed(0)
    net, x, scale = DoubleNet(), torch.randn(6, 4), torch.rand(6)

    def collate(index: list[int]) -> Any:
        if kind == "dataclass":
            return Inputs(x[index]), torch.tensor(index)
        return Pair(x[index], scale[index]), torch.tensor(index)

    loader = DataLoader(range(6), batch_size=4, collate_fn=collate)  # type: ignore[arg-type]
    got, labels = tk.extract_features(net, loader, progress=False)
    with torch.no_grad():
        want = net.lin(x.double()) * (scale.double()[:, None] if kind == "namedtuple" else 1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
    np.testing.assert_array_equal(labels, np.arange(6))
    assert x.dtype == torch.float32  # the caller's data is not changed


class CountsCalls(nn.Module):
    """A typical test wrapper: counts its calls in an attribute that forward assigns."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls, self.last_batch = net, 0, None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.last_batch = len(x)
        out: Tensor = self.net(x)
        return out


def test_attributes_that_forward_assigns_do_not_invalidate_the_cache(tmp_path: Path) -> None:
    net, x = CountsCalls(small_cnn()), images(20)
    first = tk.extract_features(
        net, x, layers="net.neck", batch_size=8, cache=tmp_path, progress=False
    )
    assert net.calls == 3
    again = tk.extract_features(
        net, x, layers="net.neck", batch_size=8, cache=tmp_path, progress=False
    )
    assert net.calls == 3  # reused: calls and last_batch are state, not configuration
    np.testing.assert_array_equal(again, first)


def test_an_empty_batch_is_skipped_and_leaves_the_cache_valid(tmp_path: Path) -> None:
    def collate(index: list[int]) -> Tensor:  # filters out samples 2 and 3
        x = torch.stack([torch.full((2,), float(i)) for i in index])
        return x[:0] if index[0] == 2 else x

    items = list(range(6))
    data = DataLoader(items, batch_size=2, collate_fn=collate)  # type: ignore[arg-type]
    for _ in range(2):  # the count mismatch is reported, not a corrupted header
        with pytest.raises(ValueError, match="data: yielded 4 samples, expected 6"):
            tk.extract_features(nn.Identity(), data, cache=tmp_path, progress=False)


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class HoldsBadRepr(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.where = where
        self.thing = BadRepr()
        self.calls = 0

    def extra_repr(self) -> str:
        if self.where == "extra_repr":
            raise RuntimeError("broken extra_repr")
        return ""

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = self.lin(x)
        return out


@pytest.mark.parametrize("where", ["attribute", "extra_repr"])
def test_a_failing_repr_in_the_model_recomputes_instead_of_crashing(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    net, x = HoldsBadRepr(where), torch.randn(6, 4)
    with caplog.at_level(logging.WARNING, logger="transferkit.features"):
        first = tk.extract_features(net, x, cache=tmp_path, progress=False).copy()
        again = tk.extract_features(net, x, cache=tmp_path, progress=False)
    assert net.calls == 2  # never reused on a fingerprint that could not see the object
    np.testing.assert_array_equal(again, first)
    assert "repr() of a" in caplog.text


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


class CachesOnFirstUse(nn.Module):
    """Builds tensors in forward and keeps them (like a rotary-embedding cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.cached: Tensor | None = None
        self.table: dict[str, list[Tensor]] = {}

    def forward(self, x: Tensor) -> Tensor:
        if self.cached is None:
            self.cached = torch.arange(4, dtype=x.dtype) + 1.0
            self.table["scales"] = [torch.full((4,), 2.0)]
            self.register_buffer("late", torch.ones(4), persistent=False)
        out: Tensor = self.lin(x) * self.cached * self.table["scales"][0] * self.late
        return out


def test_tensors_a_forward_caches_on_the_model_still_work_for_training_afterwards() -> None:
    torch.manual_seed(0)
    net = CachesOnFirstUse()
    tk.extract_features(net, torch.randn(6, 4), progress=False)
    assert net.cached is not None and not net.cached.is_inference()
    assert not net.table["scales"][0].is_inference() and not net.late.is_inference()
    net.train()
    net(torch.randn(6, 4)).sum().backward()  # raised "Inference tensors cannot be saved"
    assert net.lin.weight.grad is not None


@pytest.mark.parametrize("cache", ["", "  "])
def test_an_empty_cache_path_is_refused_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cache: expected a directory path, got an empty"):
        tk.extract_features(nn.Identity(), torch.ones(3, 2), cache=cache, progress=False)
    assert not list(tmp_path.iterdir())


class Unbounded(Dataset[Tensor]):
    """Declares 4 items but serves any index."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Tensor:
        return torch.tensor([float(index)])


@pytest.mark.parametrize("cache", [False, True])
def test_a_loader_yielding_more_samples_than_its_dataset_declares_raises(
    tmp_path: Path, cache: bool
) -> None:
    sampler = torch.utils.data.SequentialSampler(range(6))  # 6 indices for 4 items
    loader = DataLoader(Unbounded(), batch_size=2, sampler=sampler)
    for _ in range(2):  # and the cache stays readable
        with pytest.raises(ValueError, match="yielded more than the 4 samples it declares"):
            tk.extract_features(
                nn.Identity(), loader, cache=tmp_path if cache else None, progress=False
            )


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

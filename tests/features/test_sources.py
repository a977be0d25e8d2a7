"""Input handling: tensors, arrays, dicts, Datasets, DataLoaders, labels (features/_sources.py)."""

from __future__ import annotations

import collections
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
from tests.features._helpers import Inputs, TokenNet, images, small_cnn
from transferkit.features import masked_mean


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


@pytest.mark.parametrize("as_dict", [False, True])
def test_sparse_data_is_refused_by_name(as_dict: bool) -> None:
    sparse = torch.eye(4).to_sparse()
    data: Any = {"x": sparse} if as_dict else sparse
    with pytest.raises(TypeError, match=r"data(\['x'\])?: expected a dense tensor"):
        tk.extract_features(nn.Identity(), data, progress=False)


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

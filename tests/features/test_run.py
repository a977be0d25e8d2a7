"""The batch loop: precision, output shapes, empty batches (features/_run.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import transferkit as tk
from tests.features._helpers import images, small_cnn


def test_bfloat16_autocast_gives_float32_features_close_to_full_precision() -> None:
    net, x = small_cnn(), images(16)
    full = tk.extract_features(net, x, layers="neck", progress=False)
    half = tk.extract_features(net, x, layers="neck", amp=torch.bfloat16, progress=False)
    assert half.dtype == np.float32
    assert np.abs(half - full).max() <= 0.05 * np.abs(full).max()


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


def test_an_empty_batch_is_skipped_and_leaves_the_cache_valid(tmp_path: Path) -> None:
    def collate(index: list[int]) -> Tensor:  # filters out samples 2 and 3
        x = torch.stack([torch.full((2,), float(i)) for i in index])
        return x[:0] if index[0] == 2 else x

    items = list(range(6))
    data = DataLoader(items, batch_size=2, collate_fn=collate)  # type: ignore[arg-type]
    for _ in range(2):  # the count mismatch is reported, not a corrupted header
        with pytest.raises(ValueError, match="data: yielded 4 samples, expected 6"):
            tk.extract_features(nn.Identity(), data, cache=tmp_path, progress=False)


class InPlaceInput(nn.Module):
    """Normalises its input in place, as some models' first step does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out: Tensor = self.linear(x.sub_(0.5).relu_())
        return out


@pytest.mark.parametrize("kind", ["tensor", "ndarray", "float64 ndarray", "dict"])
def test_a_model_writing_to_its_input_never_changes_the_callers_data(kind: str) -> None:
    # Tensors and arrays are batched by slicing: the batches were views of the caller's
    # data, so an in-place op in the model's forward rewrote the caller's tensor or array.
    torch.manual_seed(0)
    net = InPlaceInput().eval()
    rows = torch.randn(10, 6)
    data: object = {
        "tensor": rows.clone(),
        "ndarray": rows.numpy().copy(),
        "float64 ndarray": rows.double().numpy().copy(),
        "dict": {"x": rows.clone(), "attention_mask": torch.ones(10, 6)},
    }[kind]
    expected = net.linear(rows.sub(0.5).relu()).detach().numpy()
    out = tk.extract_features(net, data, batch_size=4, progress=False)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    given = data["x"] if isinstance(data, dict) else data
    np.testing.assert_array_equal(np.asarray(given, dtype=np.float32), rows.numpy())
    # and again: the second call sees the same inputs, so it gives the same features
    np.testing.assert_allclose(
        tk.extract_features(net, data, batch_size=4, progress=False), expected, atol=1e-6
    )

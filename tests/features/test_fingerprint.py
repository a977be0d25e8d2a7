"""Fingerprints: every input byte and the model decide reuse (features/_fingerprint.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import transferkit as tk
from tests.features._helpers import Counting, Inputs, images, small_cnn


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


LEAF = 1 << 22  # the stored digests hash the input in 4 MiB leaves


def tree_digest(payload: bytes) -> str:
    """An independent re-derivation of a stored chunk digest.

    blake2b-128 over the blake2b-256 digests of the payload's 4 MiB leaves, then its length.
    """
    outer = hashlib.blake2b(digest_size=16)
    for i in range(0, len(payload), LEAF):
        outer.update(hashlib.blake2b(payload[i : i + LEAF], digest_size=32).digest())
    outer.update(len(payload).to_bytes(8, "little"))
    return outer.hexdigest()


def tensor_payload(t: Tensor) -> bytes:
    """What a tensor batch contributes: dtype, shape, then its elements in row-major order."""
    elements = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"T{t.dtype}{tuple(t.shape)}|".encode() + elements


def stored_digests(folder: Path) -> list[str]:
    header = json.loads((folder / "header.json").read_text())
    return [chunk[2] for chunk in header["chunks"]]


class FirstColumn(nn.Module):
    """Parameter-free, so any dtype goes in: the first element of every row, as float32."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(len(x), -1)[:, :1].to(torch.float32)


def test_stored_digests_hash_every_byte_however_the_bytes_are_fed(tmp_path: Path) -> None:
    # Rows of 3 MB: a non-contiguous batch is hashed in copies of 5 rows (15 MB), so the
    # pieces fed to the hash straddle its 4 MiB leaves; a contiguous one in one piece.
    rows, width = 12, 3_000_017
    base = torch.randint(0, 256, (width, rows), dtype=torch.uint8, generator=torch.Generator())
    strided = base.t()  # (rows, width), not contiguous
    contiguous = strided.contiguous()
    assert not strided.is_contiguous()
    digests = []
    for name, data in [("strided", strided), ("contiguous", contiguous)]:
        folder = tmp_path / name
        tk.extract_features(FirstColumn(), data, batch_size=8, cache=folder, progress=False)
        digests.append(stored_digests(folder))
    expected = [
        tree_digest(tensor_payload(contiguous[0:8])),
        tree_digest(tensor_payload(contiguous[8:])),
    ]
    assert digests[0] == digests[1] == expected


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]),
    seed=st.integers(0, 2**16),
)
def test_a_tensor_digest_ignores_memory_layout_but_sees_every_element(
    shape: list[int], dtype: torch.dtype, seed: int
) -> None:
    def digest(t: Tensor) -> str:
        with tempfile.TemporaryDirectory() as folder:
            tk.extract_features(FirstColumn(), t, batch_size=8, cache=folder, progress=False)
            (stored,) = stored_digests(Path(folder))
        return stored

    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 100).to(dtype)
    order = torch.randperm(len(shape), generator=g).tolist()
    strided = (
        base.permute(order).contiguous().permute(sorted(range(len(shape)), key=order.__getitem__))
    )
    assert torch.equal(strided, base)
    assert digest(strided) == digest(base) == tree_digest(tensor_payload(base))
    flat = base.reshape(-1)
    if flat.numel() > 1 and not torch.equal(flat[0], flat[-1]):
        changed = base.clone().reshape(-1)
        changed[[0, -1]] = flat[[-1, 0]]  # swap two different elements
        assert digest(changed.reshape(shape)) != digest(base)
    assert digest(base.to(torch.float16 if dtype != torch.float16 else torch.float32)) != digest(
        base
    )


def test_a_forked_child_verifies_a_cache_its_parent_wrote(tmp_path: Path) -> None:
    import multiprocessing

    data = torch.arange(3 * LEAF // 8, dtype=torch.int64).reshape(-1, 512)  # several leaves
    parent = tk.extract_features(
        FirstColumn(), data, batch_size=len(data), cache=tmp_path, progress=False
    ).copy()
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:  # the child inherits the hash threads' pool, not its threads
        calls, child = pool.apply_async(_reuse_in_child, (data, tmp_path)).get(timeout=60)
    assert calls == 0  # every digest matched: the cache was reused, not recomputed
    np.testing.assert_array_equal(child, parent)


def _reuse_in_child(data: Tensor, folder: Path) -> tuple[int, np.ndarray]:
    calls: list[int] = []
    net = FirstColumn()
    net.register_forward_pre_hook(lambda module, args: calls.append(1))  # not fingerprinted
    out = tk.extract_features(net, data, batch_size=len(data), cache=folder, progress=False)
    return len(calls), np.array(out)


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

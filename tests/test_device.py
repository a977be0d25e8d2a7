from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import OrderedDict, defaultdict, namedtuple

import numpy as np
import pytest
import torch

import transferkit as tk

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]


@dataclasses.dataclass(frozen=True)
class FrozenBatch:
    images: torch.Tensor
    note: str = "keep"


def test_resolve_device_auto_and_none_pick_an_available_backend() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert tk.resolve_device("auto").type == expected
    assert tk.resolve_device(None).type == expected


def test_resolve_device_accepts_strings_and_devices() -> None:
    assert tk.resolve_device("cpu") == torch.device("cpu")
    assert tk.resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_resolve_device_refuses_unavailable_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        tk.resolve_device("cuda")


@pytest.mark.parametrize("bad", ["gpu0", "tpu", ""])
def test_resolve_device_rejects_unknown_strings(bad: str) -> None:
    with pytest.raises(ValueError, match="device"):
        tk.resolve_device(bad)


def test_resolve_device_rejects_wrong_type() -> None:
    with pytest.raises(TypeError, match="device"):
        tk.resolve_device(0)  # type: ignore[arg-type]


def test_to_device_moves_nested_structures_and_keeps_types() -> None:
    batch = {
        "pair": Pair(torch.zeros(2), torch.ones(2)),
        "list": [torch.zeros(1), "text", 3],
        "ordered": OrderedDict(a=torch.zeros(1)),
        "dc": Batch(torch.zeros(2, 3), torch.tensor([1, 2]), ["a", "b"]),
        "frozen": FrozenBatch(torch.zeros(1)),
        "none": None,
        "array": np.zeros(2),
    }
    moved = tk.to_device(batch, "cpu")
    assert isinstance(moved["pair"], Pair)
    assert isinstance(moved["ordered"], OrderedDict)
    assert isinstance(moved["dc"], Batch)
    assert isinstance(moved["frozen"], FrozenBatch)
    assert moved["frozen"].note == "keep"
    assert moved["list"][1:] == ["text", 3]
    assert moved["dc"].ids == ["a", "b"]
    assert moved["none"] is None
    assert moved["array"] is batch["array"]
    assert torch.equal(moved["dc"].labels, torch.tensor([1, 2]))


def test_to_device_does_not_mutate_input() -> None:
    inner = [torch.zeros(1)]
    batch = {"a": inner}
    moved = tk.to_device(batch, "cpu")
    assert moved is not batch
    assert batch["a"] is inner


def test_to_device_converts_dtype_free_values_untouched() -> None:
    assert tk.to_device("hello", "cpu") == "hello"
    assert tk.to_device(5, "cpu") == 5


@pytest.mark.cuda
def test_to_device_moves_pinned_batch_to_cuda_non_blocking() -> None:
    batch = {"x": torch.randn(4, 3).pin_memory(), "y": [torch.arange(4)]}
    moved = tk.to_device(batch, "cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert moved["x"].is_cuda and moved["y"][0].is_cuda
    assert torch.equal(moved["x"].cpu(), batch["x"])


def test_autocast_disabled_is_a_noop() -> None:
    layer = torch.nn.Linear(4, 2)
    with tk.autocast("cpu", dtype=torch.bfloat16, enabled=False) as dtype:
        out = layer(torch.randn(3, 4))
    assert dtype is None
    assert out.dtype == torch.float32


def test_autocast_cpu_without_dtype_stays_fp32() -> None:
    with tk.autocast("cpu") as dtype:
        out = torch.nn.Linear(4, 2)(torch.randn(3, 4))
    assert dtype is None
    assert out.dtype == torch.float32


def test_autocast_cpu_bf16_when_asked() -> None:
    with tk.autocast("cpu", dtype=torch.bfloat16) as dtype:
        out = torch.nn.Linear(4, 2)(torch.randn(3, 4))
    assert dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16


def test_autocast_rejects_fp32_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"), tk.autocast("cpu", dtype=torch.float32):
        pass


@pytest.mark.cuda
def test_autocast_cuda_picks_bf16_when_supported() -> None:
    native = torch.cuda.get_device_capability()[0] >= 8 or bool(torch.version.hip)
    expected = torch.bfloat16 if native else torch.float16
    with tk.autocast("cuda") as dtype:
        out = torch.nn.Linear(4, 2).cuda()(torch.randn(3, 4, device="cuda"))
    assert dtype == expected
    assert out.dtype == expected


def test_seed_everything_reproduces_all_generators() -> None:
    def draw() -> tuple[float, float, torch.Tensor]:
        return random.random(), float(np.random.rand()), torch.rand(3)  # noqa: NPY002

    tk.seed_everything(123)
    first = draw()
    tk.seed_everything(123)
    second = draw()
    tk.seed_everything(124)
    third = draw()
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2])
    assert not torch.equal(first[2], third[2])


@pytest.mark.parametrize(
    ("bad", "error"),
    [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), ("0", TypeError), (True, TypeError)],
)
def test_seed_everything_rejects_bad_seeds(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="seed"):
        tk.seed_everything(bad)  # type: ignore[arg-type]


def test_seed_everything_names_the_valid_range_and_accepts_its_ends() -> None:
    # 2**64 used to fail inside torch ("Overflow when unpacking long long").
    with pytest.raises(ValueError, match=r"seed: expected an integer in \[0, 2\*\*64 - 1\]"):
        tk.seed_everything(2**64)
    for seed in (0, 2**64 - 1):
        tk.seed_everything(seed)
        first = torch.rand(3)
        tk.seed_everything(seed)
        assert torch.equal(first, torch.rand(3))


def test_seed_everything_deterministic_flag_sets_torch_mode() -> None:
    try:
        tk.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_dataloader_kwargs_cpu_has_no_pinning_or_workers() -> None:
    kwargs = tk.dataloader_kwargs("cpu")
    assert kwargs == {"pin_memory": False, "num_workers": 0, "persistent_workers": False}
    loader = torch.utils.data.DataLoader(torch.arange(4), batch_size=2, **kwargs)
    assert len(list(loader)) == 2


@pytest.mark.cuda
def test_dataloader_kwargs_cuda_pins_memory() -> None:
    kwargs = tk.dataloader_kwargs("cuda")
    assert kwargs["pin_memory"] is True
    assert kwargs["num_workers"] >= 1


def test_to_device_keeps_a_defaultdict_and_its_factory() -> None:
    # fails before the fix: defaultdict(values) raises TypeError and the batch came back
    # as a plain dict, so a later missing key raised KeyError instead of using the factory
    batch: defaultdict[str, list[torch.Tensor]] = defaultdict(list, {"x": [torch.ones(2)]})
    moved = tk.to_device(batch, "cpu")
    assert type(moved) is defaultdict
    assert moved.default_factory is list
    assert torch.equal(moved["x"][0], torch.ones(2))
    assert moved["absent"] == []
    assert "absent" not in batch  # the input was not touched


@dataclasses.dataclass
class BatchWithMask:
    images: torch.Tensor
    mask: torch.Tensor | None = dataclasses.field(init=False, default=None)


@dataclasses.dataclass(frozen=True)
class FrozenWithDerived:
    images: torch.Tensor
    total: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.images.sum())


def test_to_device_keeps_dataclass_fields_set_after_construction() -> None:
    # fails before the fix: dataclasses.replace() rebuilt the batch from its init fields,
    # so an init=False field set later came back as its default (None)
    batch = BatchWithMask(torch.zeros(2, 3))
    batch.mask = torch.tensor([True, False])
    moved = tk.to_device(batch, "cpu")
    assert moved.mask is not None
    assert torch.equal(moved.mask, torch.tensor([True, False]))
    assert moved is not batch and batch.mask is not None  # the input was not touched
    derived = tk.to_device(FrozenWithDerived(torch.ones(3)), "cpu")
    assert isinstance(derived, FrozenWithDerived) and float(derived.total) == 3.0


@pytest.mark.parametrize(
    ("capabilities", "device", "expected"),
    [
        ([(7, 5)], "cuda", torch.float16),  # T4: bf16 only emulated
        ([(7, 0)], "cuda", torch.float16),  # V100
        ([(8, 0)], "cuda", torch.bfloat16),  # A100
        ([(9, 0), (7, 5)], "cuda:1", torch.float16),  # the asked device, not the current
        ([(7, 5), (9, 0)], "cuda:1", torch.bfloat16),
    ],
)
def test_autocast_cuda_picks_fp16_where_bf16_is_only_emulated(
    monkeypatch: pytest.MonkeyPatch,
    capabilities: list[tuple[int, int]],
    device: str,
    expected: torch.dtype,
) -> None:
    # fails before the fix: torch.cuda.is_bf16_supported() counts emulated bf16 (its
    # default including_emulation=True) and asks about the current device only, so a
    # T4 or V100 (or a cuda:1 next to an A100) got slow emulated bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capabilities[i or 0])
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: including_emulation or capabilities[0][0] >= 8,
    )
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch, "autocast", lambda **kwargs: contextlib.nullcontext())
    with tk.autocast(device) as dtype:
        pass
    assert dtype == expected


def test_seed_everything_gives_wide_seeds_their_own_numpy_stream() -> None:
    # fails before the fix: NumPy was seeded with seed % 2**32, so seeds 5 and 5 + 2**32
    # drew the same NumPy numbers (while torch's differed)
    draws = []
    for seed in (5, 5 + 2**32, 2**64 - 1, 2**32 - 1):
        tk.seed_everything(seed)
        draws.append(tuple(np.random.rand(4).tolist()))  # noqa: NPY002
    assert len(set(draws)) == 4
    np.random.seed(5)  # noqa: NPY002 - a seed below 2**32 keeps its historical stream
    assert tuple(np.random.rand(4).tolist()) == draws[0]  # noqa: NPY002


class _RandomTriple(torch.utils.data.Dataset[tuple[float, float, float]]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))  # noqa: NPY002


@pytest.mark.slow
def test_seed_everything_makes_dataloader_workers_reproducible_and_distinct() -> None:
    # each worker's random / NumPy / torch generators follow the seeded base seed
    def epoch() -> list[list[float]]:
        loader = torch.utils.data.DataLoader(_RandomTriple(), batch_size=None, num_workers=2)
        return [list(item) for item in loader]

    tk.seed_everything(11)
    first = epoch()
    tk.seed_everything(11)
    assert epoch() == first
    tk.seed_everything(12)
    assert epoch() != first
    # the two workers (items 0, 2 and 1, 3) draw different numbers in every generator
    assert all(first[0][k] != first[1][k] for k in range(3))


def test_to_device_moves_a_packed_sequence_keeping_batch_sizes_on_the_cpu() -> None:
    # fails before the fix: the PackedSequence was rebuilt field by field with batch_sizes
    # on the target device, which torch refuses ("batch_sizes should always be on CPU");
    # the meta device stands in for a GPU on machines without one
    from torch.nn.utils.rnn import pack_padded_sequence

    packed = pack_padded_sequence(
        torch.randn(3, 4, 2), torch.tensor([4, 2, 3]), batch_first=True, enforce_sorted=False
    )
    moved = tk.to_device({"tokens": packed, "ids": [torch.arange(3)]}, torch.device("meta"))
    out = moved["tokens"]
    assert type(out) is type(packed)
    assert out.data.device.type == "meta" and out.sorted_indices.device.type == "meta"
    assert out.batch_sizes.device.type == "cpu"
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert moved["ids"][0].device.type == "meta"
    assert packed.data.device.type == "cpu"  # the input was not touched


def test_to_device_copies_asynchronously_only_from_the_host_to_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fails before the fix: every copy from the CPU asked for non_blocking, also to MPS,
    # where torch's asynchronous copy can read a freed source and corrupt data silently
    # (pytorch/pytorch#189690). The meta device stands in for a non-CUDA accelerator.
    seen: list[bool] = []
    original = torch.Tensor.to

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(bool(kwargs.get("non_blocking", False)))
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "to", spy)
    moved = tk.to_device({"x": torch.ones(2), "y": [torch.zeros(1)]}, torch.device("meta"))
    assert moved["x"].device.type == "meta"
    assert seen == [False, False]

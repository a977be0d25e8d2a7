"""The caller's model is left exactly as it was (features/_guard.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import transferkit as tk
from tests.features._helpers import (
    Counting,
    assert_unchanged,
    images,
    in_two_threads,
    small_cnn,
    snapshot,
)


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


class BadBatch(Dataset[Tensor]):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> Tensor:
        if index == 9:
            raise OSError("unreadable image")
        return images(1, seed=index)[0]


@pytest.mark.parametrize("failure", ["meta", "bad-batch", "forward"])  # +1 in test_faults
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


def test_extract_features_on_one_model_from_two_threads_gives_the_serial_results(
    tmp_path: Path,
) -> None:
    net = small_cnn().train()
    inputs = [images(20, seed=s) for s in range(2)]
    serial = [tk.extract_features(net, x, batch_size=4, progress=False) for x in inputs]
    results = in_two_threads(
        lambda i: tk.extract_features(net, inputs[i], batch_size=4, progress=False), repeats=10
    )
    for i in range(2):
        for out in results[i]:
            np.testing.assert_array_equal(out, serial[i])
    assert all(m.training for m in net.modules())


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

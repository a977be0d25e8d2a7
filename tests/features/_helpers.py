"""Models, data and cache helpers shared by the feature-extraction tests."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import transferkit as tk

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


def cache_once(folder: Path, n: int = 40) -> tuple[tk.models.SmallCNN, Tensor, np.ndarray]:
    net, x = small_cnn(), images(n)
    out = tk.extract_features(net, x, layers="neck", batch_size=16, cache=folder, progress=False)
    return net, x, np.array(out)


def point_header_at(folder: Path, name: str) -> None:
    header = json.loads((folder / "header.json").read_text())
    header["files"]["neck"]["file"] = name
    (folder / "header.json").write_text(json.dumps(header))


@dataclasses.dataclass
class Inputs:
    x: Tensor


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


def in_two_threads(call: Callable[[int], Any], repeats: int) -> list[list[Any]]:
    """``call(i)`` ``repeats`` times in each of two threads started together; the results."""
    results: list[list[Any]] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(repeats):
                results[i].append(call(i))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results

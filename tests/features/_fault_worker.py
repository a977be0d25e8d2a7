"""A child process for tests/features/test_faults.py: one cached extraction.

``python -m tests.features._fault_worker CACHE OUT [--delay S] [--kind tensor|dataset]``
extracts the features of a fixed model and data set into ``CACHE`` (header saved after
every batch, so a kill can land anywhere), prints ``batch`` after each forward pass,
saves the features (and labels) to ``OUT`` (.npz) and prints ``calls=<forward passes>``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import transferkit as tk
from transferkit.features import _cache  # the header-save interval: a test-only knob

N, BATCH = 96, 8


def model() -> nn.Module:
    torch.manual_seed(0)
    return tk.models.SmallCNN(num_classes=10, width=8, feature_dim=16).eval()


def data(kind: str) -> object:
    x = torch.randn(N, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.arange(N) % 10
    return x if kind == "tensor" else TensorDataset(x, y)


class Probe:
    """A plain object: fingerprinted by its ``repr``, which does not show the values."""

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, 0


class Announce(nn.Module):
    def __init__(self, net: nn.Module, delay: float) -> None:
        super().__init__()
        # In a plain object: module attributes are part of the cache key, and runs with
        # different delays must share the cache.
        self.net, self.probe = net, Probe(delay)

    def forward(self, x: Tensor) -> Tensor:
        self.probe.calls += 1
        out: Tensor = self.net(x)
        print("batch", flush=True)
        time.sleep(self.probe.delay)
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("out")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--kind", default="dataset")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _cache._HEADER_INTERVAL_S = 0.0  # save the header after every batch
    _cache._HEADER_COST_FACTOR = 0.0
    net = Announce(model(), args.delay)
    result = tk.extract_features(
        net,
        data(args.kind),
        layers="net.neck",
        batch_size=BATCH,
        cache=args.cache,
        progress=False,
    )
    features, labels = result if isinstance(result, tuple) else (result, np.zeros(0))
    np.savez(args.out, features=np.asarray(features), labels=np.asarray(labels))
    print(f"calls={net.probe.calls}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()

"""Freezing through a DistributedDataParallel wrapper (two CPU processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import transferkit as tk
from tests._dist_utils import run_distributed


def _ddp_worker(rank: int, world: int) -> dict[str, object]:
    torch.manual_seed(0)
    net = tk.models.SmallCNN(num_classes=4, width=4, feature_dim=16)
    tk.freeze(net, exclude="fc")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = nn.parallel.DistributedDataParallel(net)  # find_unused_parameters=False
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    gen = torch.Generator().manual_seed(rank)
    model.train()
    for _ in range(3):
        x = torch.randn(6, 1, 12, 12, generator=gen)
        y = torch.randint(0, 4, (6,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    error = ""
    try:
        tk.freeze(model, include="fc")
    except ValueError as exc:
        error = str(exc)
    after = net.state_dict()
    return {
        "frozen_unchanged": all(torch.equal(before[k], after[k]) for k in before if "fc." not in k),
        "fc_moved": not torch.equal(before["fc.weight"], after["fc.weight"]),
        "fc": after["fc.weight"].clone(),
        "error": error,
    }


@pytest.mark.distributed
def test_frozen_model_trains_under_ddp_without_unused_parameter_error(tmp_path: Path) -> None:
    results = run_distributed(_ddp_worker, tmp_path)
    for result in results:
        assert result["frozen_unchanged"] and result["fc_moved"]
        assert "find_unused_parameters=False" in str(result["error"])
    torch.testing.assert_close(results[0]["fc"], results[1]["fc"], rtol=0, atol=0)

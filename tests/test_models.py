"""The reference networks: layout, shapes and the optional BatchNorm bottleneck."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transferkit as tk


def test_small_cnn_plain_neck_is_linear_relu() -> None:
    net = tk.models.SmallCNN(width=4, feature_dim=16)
    kinds = [type(m) for m in net.neck]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU]


def test_small_cnn_batch_neck_normalises_each_feature_before_relu() -> None:
    torch.manual_seed(0)
    net = tk.models.SmallCNN(width=4, feature_dim=16, neck_norm="batch").train()
    assert [type(m) for m in net.neck] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU]
    x = torch.randn(64, 1, 16, 16) * 5 + 3
    hidden = net.neck[:3](net.features(x))  # before the ReLU
    torch.testing.assert_close(hidden.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.var(0, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    assert net.forward_features(x).shape == (64, 16)
    assert net(x).shape == (64, 10)


def test_small_cnn_batch_neck_gets_domain_specific_statistics() -> None:
    """convert_domain_bn turns the bottleneck's BatchNorm into per-domain statistics too."""
    torch.manual_seed(0)
    net = tk.convert_domain_bn(tk.models.SmallCNN(width=4, feature_dim=8, neck_norm="batch"))
    net.train()
    with tk.bn_domain(net, "source"):
        net(torch.randn(16, 1, 16, 16))
    with tk.bn_domain(net, "target"):
        net(torch.randn(16, 1, 16, 16) + 4)
    stats = {k: v for k, v in net.state_dict().items() if k.startswith("neck.2") and "mean" in k}
    assert len(stats) == 2, sorted(stats)
    first, second = stats.values()
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("value", ["layer", "Batch", 1])
def test_small_cnn_rejects_unknown_neck_norm(value: object) -> None:
    with pytest.raises((ValueError, TypeError), match="neck_norm"):
        tk.models.SmallCNN(neck_norm=value)  # type: ignore[arg-type]

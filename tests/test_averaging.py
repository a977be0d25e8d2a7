"""Weight averaging (`tk.ModelEMA`): the mean teacher of self-training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import transferkit as tk

# --------------------------------------------------------------------------- ModelEMA


def _ema_reference(values: list[np.ndarray], decay: float) -> np.ndarray:
    """An independent NumPy loop: d_t = min(decay, 1 - 1/(t+1)), avg = d avg + (1-d) w."""
    average = np.zeros_like(values[0])
    for t, value in enumerate(values):
        d = min(decay, 1.0 - 1.0 / (t + 1))
        average = d * average + (1.0 - d) * value
    return average


@given(st.floats(0.0, 0.999), st.integers(1, 30))
def test_model_ema_matches_a_numpy_reference(decay: float, steps: int) -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = tk.ModelEMA(net, decay=decay)
    seen = []
    for _ in range(steps):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        seen.append(net.weight.detach().double().numpy().copy())
        ema.update(net)
    expected = _ema_reference(seen, decay)
    np.testing.assert_allclose(ema.module.weight.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert ema.updates == steps


def test_model_ema_starts_as_a_plain_average_then_decays() -> None:
    net = nn.Linear(1, 1, bias=False)
    ema = tk.ModelEMA(net, decay=0.9)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
    assert float(ema.module.weight) == pytest.approx(2.0)  # mean of 1, 2, 3 (warm-up)
    assert ema.current_decay == pytest.approx(0.75)
    for _ in range(20):
        ema.update(net)
    assert ema.current_decay == 0.9


def test_model_ema_copies_buffers_and_does_not_train_or_touch_the_model() -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    ema = tk.ModelEMA(net, decay=0.99)
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in net.parameters())
    net(torch.randn(16, 2))  # training mode: updates the running statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ema.update(net)
    torch.testing.assert_close(ema.module[1].running_mean, net[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == 1
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])
    assert ema.module[0].weight is not net[0].weight


def test_model_ema_state_dict_round_trip_keeps_the_warmup(tmp_path: Path) -> None:
    net = nn.Linear(2, 2)
    ema = tk.ModelEMA(net, decay=0.99)
    for _ in range(3):
        ema.update(net)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    other = tk.ModelEMA(nn.Linear(2, 2), decay=0.99)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.updates == 3 and other.current_decay == ema.current_decay
    torch.testing.assert_close(other.module.weight, ema.module.weight)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "model"),
        ({"decay": 1.0}, ValueError, "decay"),
        ({"decay": -0.1}, ValueError, "decay"),
        ({"decay": True}, TypeError, "decay"),
        ({"decay": "0.9"}, TypeError, "decay"),
    ],
)
def test_model_ema_rejects_bad_arguments(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    model = kwargs.pop("model", nn.Linear(2, 2))
    with pytest.raises(error, match=match):
        tk.ModelEMA(model, **kwargs)  # type: ignore[arg-type]


def test_model_ema_update_rejects_another_architecture() -> None:
    ema = tk.ModelEMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="architecture"):
        ema.update(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="shape"):
        ema.update(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="model"):
        ema.update("net")  # type: ignore[arg-type]

"""TF32 in the feature cache key (CUDA only; the key function is checked directly here).

cuDNN convolutions run in TF32 by default on CUDA (about 1e-3 relative error): before
the fix such rows shared a cache with float32 CPU rows, since the key ignores the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import transferkit as tk
from transferkit.features._planner import _tf32_in_effect

from ._helpers import Counting, images, small_cnn


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@pytest.mark.usefixtures("tf32_flags")
def test_the_key_records_tf32_on_cuda_only_outside_autocast() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    assert _tf32_in_effect(cuda, None) == "conv"  # torch's default on CUDA
    torch.backends.cuda.matmul.allow_tf32 = True
    assert _tf32_in_effect(cuda, None) == "conv+matmul"
    assert _tf32_in_effect(cuda, "cuda:float16") is None  # the autocast entry says it
    assert _tf32_in_effect(cpu, None) is None  # no TF32 on the CPU
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    assert _tf32_in_effect(cuda, None) is None  # plain float32: shares with the CPU


@pytest.mark.cuda
@pytest.mark.usefixtures("tf32_flags")
def test_tf32_rows_of_a_gpu_are_not_served_to_a_float32_cpu_call(tmp_path: Path) -> None:
    net, x = Counting(small_cnn()), images(16)
    torch.backends.cudnn.allow_tf32 = True
    tk.extract_features(net, x, layers="net.neck", cache=tmp_path, device="cuda", progress=False)
    calls = net.calls
    cpu = tk.extract_features(
        net, x, layers="net.neck", cache=tmp_path, device="cpu", progress=False
    )
    assert net.calls > calls, "TF32 rows from the GPU were served to a float32 CPU call"
    full = tk.extract_features(net, x, layers="net.neck", device="cpu", progress=False)
    np.testing.assert_array_equal(cpu, full)

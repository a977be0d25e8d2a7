"""Where tensors live and in which precision.

Small helpers that every training loop needs and that are easy to get subtly wrong:
picking a device, moving nested batches, choosing the autocast dtype, seeding every
random generator, and DataLoader settings that suit the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence

from ._batch import children, rebuild
from ._validation import check_bool, check_seed

__all__ = ["autocast", "dataloader_kwargs", "resolve_device", "seed_everything", "to_device"]

logger = logging.getLogger(__name__)

DeviceLike = str | torch.device | None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: DeviceLike = "auto") -> torch.device:
    """Turn ``"auto"``, ``None``, a string or a ``torch.device`` into a usable device.

    ``"auto"`` (and ``None``) picks CUDA when available, else Apple MPS, else the CPU.
    Asking explicitly for a backend that is not available raises instead of silently
    falling back, so a job meant for a GPU never runs on the CPU by accident.

    Args:
        device: ``"auto"``, ``None``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a
            ``torch.device``.

    Returns:
        The resolved ``torch.device``.

    Raises:
        TypeError: if ``device`` is not a string, ``torch.device`` or ``None``.
        ValueError: for an unknown device string or an unavailable backend.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("auto").type in {"cpu", "cuda", "mps"}
        True
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError as err:
            raise ValueError(
                f"device: expected 'auto', 'cpu', 'cuda[:N]' or 'mps', got {device!r}"
            ) from err
    else:
        raise TypeError(
            f"device: expected a str, torch.device or None, got {type(device).__name__}"
        )
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {str(resolved)!r} was requested but CUDA is not available; "
                "use device='auto' to fall back to the CPU"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {str(resolved)!r} does not exist; "
                f"{torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if resolved.type == "mps" and not _mps_available():
        raise ValueError("device: 'mps' was requested but MPS is not available")
    return resolved


def to_device(obj: Any, device: DeviceLike, non_blocking: bool = True) -> Any:
    """Move every tensor inside a (nested) batch to ``device``.

    Handles tensors, modules' usual batch containers (``dict`` and other mappings,
    ``list``, ``tuple``, ``namedtuple``) and dataclass instances, rebuilding each container
    with its own type. A ``PackedSequence`` moves with its own ``.to`` (its
    ``batch_sizes`` stay on the CPU, as recurrent layers require). Other values
    (strings, numbers, ``None``, arrays) are returned unchanged. The input is never
    modified in place.

    ``non_blocking=True`` overlaps host-to-CUDA copies with compute when the source tensor
    is in pinned memory (see [`dataloader_kwargs`][]); it is ignored for other transfers
    (to MPS, whose asynchronous copies from the CPU can silently corrupt data in current
    torch releases; from a GPU back to the CPU, which would be readable too early).

    Args:
        obj: a tensor or a nested container of tensors.
        device: target device (anything [`resolve_device`][] accepts).
        non_blocking: use asynchronous copies where possible.

    Returns:
        A structure of the same shape with every tensor on ``device``.

    Examples:
        >>> batch = {"x": torch.zeros(2, 3), "meta": ["a", "b"], "y": (torch.ones(2),)}
        >>> moved = to_device(batch, "cpu")
        >>> moved["x"].device, moved["meta"]
        (device(type='cpu'), ['a', 'b'])
    """
    check_bool(non_blocking, "non_blocking")
    target = resolve_device(device)
    # asynchronous copies only host -> CUDA: CPU -> MPS non_blocking copies can read the
    # source after it is freed and silently corrupt data (pytorch/pytorch#189690), and a
    # non_blocking device -> host copy may be read before it has landed
    return _move(obj, target, non_blocking and target.type == "cuda")


def _move(obj: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(obj, PackedSequence):
        # its batch_sizes must stay on the CPU (torch refuses a PackedSequence otherwise)
        packed: Any = obj  # torch types PackedSequence.to with Tensor.to's first overload only
        return packed.to(device, non_blocking=non_blocking and obj.data.device.type == "cpu")
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking and obj.device.type == "cpu")
    node = children(obj)
    if node is None:
        return obj
    kind, items = node
    return rebuild(obj, kind, [(key, _move(value, device, non_blocking)) for key, value in items])


def _cuda_bf16_native(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes in bf16 natively (compute capability >= 8.0).

    ``torch.cuda.is_bf16_supported()`` also answers ``True`` where bf16 is only emulated
    (e.g. a T4 or V100: slow kernels) and asks about the *current* device, not
    ``device``; ROCm GPUs that torch supports all have bf16.
    """
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported())
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 8


def _autocast_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float16 or torch.bfloat16, got {dtype}")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if _cuda_bf16_native(device) else torch.float16
    # CPU and MPS autocast only when the caller asks for a dtype: CPU fp16 is slow and
    # bf16 changes numerics, so it must be an explicit choice.
    return None


@contextlib.contextmanager
def autocast(
    device: DeviceLike, dtype: torch.dtype | None = None, enabled: bool = True
) -> Iterator[torch.dtype | None]:
    """Mixed-precision context that picks a sensible dtype for the device.

    * CUDA: ``dtype=None`` chooses bf16 where the GPU computes it natively (compute
      capability 8.0 or newer: Ampere, Hopper, ...; every ROCm GPU), else fp16. GPUs
      where ``torch.cuda.is_bf16_supported()`` is true only through emulation (T4,
      V100) get fp16. The capability is read for ``device`` itself (e.g. ``"cuda:1"``).
    * CPU / MPS: autocast is enabled only when ``dtype`` is given (bf16 on CPU).
    * ``enabled=False``: a no-op, so code can keep one ``with`` block for both paths.

    The context yields the dtype in effect (``None`` when autocast is off).

    Args:
        device: the device the computation runs on.
        dtype: ``torch.float16``, ``torch.bfloat16`` or ``None`` for the default.
        enabled: turn autocast off without changing the calling code.

    Examples:
        >>> with autocast("cpu", dtype=torch.bfloat16) as dt:
        ...     y = torch.nn.Linear(4, 2)(torch.randn(3, 4))
        >>> dt, y.dtype
        (torch.bfloat16, torch.bfloat16)
        >>> with autocast("cpu", enabled=False) as dt:
        ...     pass
        >>> dt is None
        True
    """
    check_bool(enabled, "enabled")
    target = resolve_device(device)
    chosen = _autocast_dtype(target, dtype)
    if not enabled or chosen is None:
        yield None
        return
    with torch.autocast(device_type=target.type, dtype=chosen):
        yield chosen


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device).

    With ``deterministic=True`` also asks torch for deterministic kernels (cuDNN benchmark
    off, ``torch.use_deterministic_algorithms`` in warn-only mode, and the cuBLAS workspace
    setting that deterministic GEMMs need; set before CUDA's first GEMM to take effect).
    These are process-wide settings: ``deterministic=False`` leaves them as they are (it
    does not undo an earlier ``deterministic=True``, nor a setting you made yourself).

    DataLoader worker processes need no extra step: torch seeds each worker's ``random``,
    NumPy and torch generators from a base seed drawn from torch's generator, which this
    call seeds.

    Args:
        seed: an integer in ``[0, 2**64 - 1]`` (the range torch's generators accept).
        deterministic: trade speed for bit-reproducible kernels.

    Raises:
        TypeError: ``seed`` is not an integer or ``deterministic`` not a bool.
        ValueError: ``seed`` is outside ``[0, 2**64 - 1]``.

    Examples:
        >>> seed_everything(0); a = torch.rand(2)
        >>> seed_everything(0); b = torch.rand(2)
        >>> bool((a == b).all())
        True
    """
    seed = check_seed(seed)
    check_bool(deterministic, "deterministic")
    random.seed(seed)
    # the legacy global generator users rely on takes 32-bit words: a seed below 2**32
    # as itself (as always), a wider one as two words, so no two seeds share a stream
    np.random.seed(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])  # noqa: NPY002
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    logger.debug("seeded python/numpy/torch with %d (deterministic=%s)", seed, deterministic)


def dataloader_kwargs(device: DeviceLike) -> dict[str, Any]:
    """DataLoader keyword arguments that suit ``device``.

    On CUDA: pinned memory (so [`to_device`][] copies asynchronously) and worker
    processes that persist between epochs. On CPU and MPS: no pinning, loading in the main
    process (the data sets of small transfer tasks are usually in memory already).

    Examples:
        >>> dataloader_kwargs("cpu")
        {'pin_memory': False, 'num_workers': 0, 'persistent_workers': False}
    """
    target = resolve_device(device)
    if target.type == "cuda":
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        return {
            "pin_memory": True,
            "num_workers": workers,
            "persistent_workers": True,
            "prefetch_factor": 4,
        }
    return {"pin_memory": False, "num_workers": 0, "persistent_workers": False}

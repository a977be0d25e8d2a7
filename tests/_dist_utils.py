"""Run a function in several real processes with the gloo backend (CPU)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import transferkit as tk


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int, world: int, port: int, fn: Callable[..., Any], out: str, args: tuple[Any, ...]
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        if dist.is_initialized():  # ``fn`` may have ended the run itself
            tk.distributed.shutdown()  # every rank done, then a teardown without gloo's exit race
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], tmp_path: Path, *args: Any, world: int = 2
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; return their results."""
    mp.spawn(_entry, args=(world, free_port(), fn, str(tmp_path), args), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

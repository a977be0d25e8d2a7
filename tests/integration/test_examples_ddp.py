from __future__ import annotations

import socket

import pytest

from ._examples import run_example


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_dann_smoke_under_torchrun_beats_source_only_with_identical_replicas() -> None:
    result = run_example(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "examples/ddp_dann.py",
        "--smoke",
    )
    assert "2 process(es), backend gloo" in result.stdout
    assert "| dann |" in result.stdout
    assert "parameters identical on every rank: True" in result.stdout

"""What every benchmark script shares: where results go, the machine, atomic writes.

A script imports it after putting its own folder on ``sys.path`` (so that it also works
when a test loads the script by file path)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import RESULTS, environment, load_average, write_atomic, write_results
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit._io import write_bytes_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages of the machine (``None`` where there are none).

    Other jobs on a shared machine slow a benchmark down: every result records the load.
    """
    if not hasattr(os, "getloadavg"):
        return None
    return [round(value, 2) for value in os.getloadavg()]


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine, library versions, torch threads and current load, for a results file.

    ``load_average_at_start`` (the 1-minute value) is kept for the older results files
    and pages that read it.
    """
    device = torch.device(device)
    processor = platform.processor() or platform.machine()
    load = load_average()
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else processor,
        "processor": processor,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load_average": load,
        "load_average_at_start": None if load is None else load[0],
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating missing folders.

    A reader (or a crash) never leaves a half-written results file behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"))


def write_results(json_path: Path, result: dict[str, Any], markdown: str) -> None:
    """Write ``result`` as JSON to ``json_path`` and ``markdown`` next to it as ``.md``.

    Both writes are atomic: a results table never stands next to half of its numbers.
    """
    write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    write_atomic(json_path.with_suffix(".md"), markdown)

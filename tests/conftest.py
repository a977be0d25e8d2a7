"""Shared test configuration: markers that skip with a visible reason."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# Tests use tiny tensors: one intra-op thread avoids oversubscribing a 2-core machine
# (and makes timings of the small end-to-end checks predictable).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Each test module runs on one intra-op thread, and a module that changes the count
    gets the previous one back: the models here are tiny, and several threads on a busy
    machine spend their time spin-waiting (up to 100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


settings.register_profile("transferkit", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("transferkit")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_cuda = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    missing = [name for name in ("torchvision", "timm") if importlib.util.find_spec(name) is None]
    no_vision = pytest.mark.skip(
        reason=f"needs the 'vision' extra ({', '.join(missing)} not installed); "
        "run `make test` which uses .venv-vision"
    )
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "vision" in item.keywords and missing:
            item.add_marker(no_vision)

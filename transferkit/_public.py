"""Public objects report their package as their module (private; a bottom layer).

A package such as ``transferkit.selection`` keeps its code in private files
(``_logme.py``, ...). Its ``__init__`` calls [`publish`][] on the names of ``__all__`` so
that each public class and function says ``transferkit.selection`` in ``__module__``:
pickles, reprs and the feature cache's model fingerprints name the public path, which
stays put when code moves between private files.

Doctest looks for a class's method examples only in the module the class reports, where
the methods' globals do not live; ``publish`` therefore lists those methods in the
private file's ``__test__`` so that their examples still run, with the private file's
globals.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

__all__ = ["publish"]


def _function(value: Any) -> Any:
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    if isinstance(value, property):
        return value.fget
    return value


def publish(package: str, namespace: MutableMapping[str, Any], names: Iterable[str]) -> None:
    """Set ``__module__`` of the package's public objects to the package's name.

    Args:
        package: the package's ``__name__``.
        namespace: the package's ``globals()``.
        names: the public names (the package's ``__all__``).
    """
    for name in names:
        obj = namespace[name]
        home = getattr(obj, "__module__", None)
        if not (isinstance(home, str) and home.startswith("transferkit.")):
            continue
        if home == package or not any(part.startswith("_") for part in home.split(".")):
            continue  # already public (e.g. re-exported from another public module)
        if inspect.isclass(obj):
            tests = vars(sys.modules[home]).setdefault("__test__", {})
            for attr, value in vars(obj).items():
                func = _function(value)
                doc = getattr(func, "__doc__", None)
                if inspect.isfunction(func) and doc and ">>>" in doc:
                    tests[f"{name}.{attr}"] = func
        obj.__module__ = package

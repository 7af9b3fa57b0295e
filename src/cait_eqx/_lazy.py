"""Lazy public namespaces: a package lists its public names once, imports them on first use.

A package's `__init__.py` writes its re-exports as ordinary imports under `if TYPE_CHECKING:` (what type
checkers, IDEs and the documentation read) and calls `attach(__name__, __file__)` otherwise. `attach` reads
those same import lines and imports each submodule only when one of its names is first asked for. So
`import cait_eqx` does not import JAX, and `cait-eqx --help` answers at once.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["attach"]


def _exports(path: str) -> dict[str, tuple[str, str]]:
    """`{public name: (relative module, name there)}` from the `if TYPE_CHECKING:` imports of `path`."""
    tree = ast.parse(Path(path).read_text())
    found: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"):
            continue
        for statement in node.body:
            if isinstance(statement, ast.ImportFrom) and statement.level >= 1:  # relative imports only
                module = "." * statement.level + (statement.module or "")
                for alias in statement.names:
                    found[alias.asname or alias.name] = (module, alias.name)
    if not found:
        raise RuntimeError(f"{path} declares no `if TYPE_CHECKING:` re-exports for `attach` to read.")
    return found


def attach(package: str, path: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """`(__getattr__, __dir__, __all__)` for the package `package` whose `__init__.py` is `path`."""
    exports = _exports(path)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attr = exports[name]
        value = getattr(importlib.import_module(module, package), attr)
        # Cache it in the package namespace, so the next access is a plain attribute lookup.
        importlib.import_module(package).__dict__[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__, sorted(exports)

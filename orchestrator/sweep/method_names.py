"""The method names ``--methods`` accepts, known before torch is imported.

The registry (``workers/presses/registry.py``) is filled by importing every press, and every
press imports torch: 2-5 s before a typo in ``--methods`` could be refused. The names are
read here from the press files themselves instead, without running them: each class decorated
with ``@register`` in ``workers/presses/*.py`` and its ``name = "..."``. This is not a second
list: it is read from the same lines the registry is filled from. Where it cannot tell (no
source files, a name that is not a string literal) it answers None, and the registry itself
judges, later. A press registered in this process from elsewhere (a notebook's, a test's) is
known too once the registry is imported: its names are added, never read from a second list.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path

from orchestrator.errors import KvorchError
from workers.contract.defaults import ALL_METHODS, METHOD_PRESETS


@functools.cache
def declared_names() -> frozenset[str] | None:
    """Every name a press in workers/presses/ registers, or None when the files cannot say."""
    found = importlib.util.find_spec("workers.presses")  # imports workers/, not workers.presses
    folders = list(found.submodule_search_locations or []) if found else []
    names: set[str] = set()
    for folder in folders:
        for path in sorted(Path(folder).glob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            except (OSError, SyntaxError, ValueError):
                return None
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
                    name = _class_name(node)
                    if name is None:
                        return None
                    names.add(name)
    return frozenset(names) or None


def check_method_names(texts: list[str]) -> None:
    """Refuse an unknown method name in ``texts`` (``name[:key=value,...]`` or ``all``) with
    the registry's own message, before torch is imported; unknown parameters are the registry's."""
    names = declared_names()
    if names is None:
        return
    registry = sys.modules.get("workers.presses.registry")  # already imported: no torch is loaded here
    names = names | frozenset(getattr(registry, "REGISTRY", ()))
    for text in texts:
        name = text.strip().partition(":")[0]
        if name not in METHOD_PRESETS and name not in names:
            valid = [*(n for n in ALL_METHODS if n in names), *sorted(n for n in names if n not in ALL_METHODS)]
            presets = ", ".join(METHOD_PRESETS)
            raise KvorchError(f"--methods: unknown method {name!r}; valid methods: {', '.join(valid)} (or {presets})")


def _is_register(decorator: ast.expr) -> bool:
    return (isinstance(decorator, ast.Name) and decorator.id == "register") or (
        isinstance(decorator, ast.Attribute) and decorator.attr == "register"
    )


def _class_name(node: ast.ClassDef) -> str | None:
    """The class's ``name = "..."`` (None when it has none as a string literal)."""
    for statement in node.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        if isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        value = getattr(statement, "value", None)
        if any(isinstance(t, ast.Name) and t.id == "name" for t in targets):
            return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None
    return None

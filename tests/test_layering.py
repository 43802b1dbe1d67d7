"""The three floors import only downwards: bench/ -> orchestrator/ -> workers/ (docs/DESIGN.md,
"Architecture"). workers/ runs inside Ray actors and must not drag the driver's code (DuckDB,
the lake, the CLI) into them; orchestrator/ must not depend on benchmark scripts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# floor -> the top-level packages it must never import
FORBIDDEN = {"workers": {"orchestrator", "bench", "sql"}, "orchestrator": {"bench"}, "sql": {"orchestrator", "workers"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_every_import_points_down(floor):
    upward = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[floor])
        for path in sorted((ROOT / floor).rglob("*.py"))
    }
    assert {file: names for file, names in upward.items() if names} == {}

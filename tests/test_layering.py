"""The floors import only downwards: bench/ -> kvorch/ -> orchestrator/ -> workers/ (docs/DESIGN.md,
"Architecture"). workers/ runs inside Ray actors and must not drag the driver's code (DuckDB,
the lake, the CLI) into them; orchestrator/ must not depend on benchmark scripts or on the
notebook API; kvorch/ (the notebook API) reads the lake through orchestrator's lake and reports
only, so importing it stays fast (no torch, transformers or Ray). Inside orchestrator/, the
feature packages import only the ones below them (each package's docstring says which)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# floor -> the top-level packages it must never import
FORBIDDEN = {
    "workers": {"orchestrator", "bench", "sql", "kvorch"},
    "orchestrator": {"bench", "kvorch"},
    "sql": {"orchestrator", "workers", "kvorch"},
    "kvorch": {"bench", "workers", "torch", "transformers", "ray"},
}
# The rooms of orchestrator/ that kvorch/ may import (its own rank sits above them, beside cli).
KVORCH_READS = {"errors", "lake", "reports"}


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


# orchestrator/'s rooms, bottom first: a room may import only rooms of a lower rank.
RANKS = {
    "errors": 0, "corpus": 1, "lake": 2, "probes": 2, "pool": 3, "reports": 3, "sweep": 4, "kvzap": 4, "scores": 4,
    "heads": 5, "cli": 6,
}  # fmt: skip


def test_orchestrator_packages_import_only_downwards():
    upward = []
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        parts = path.relative_to(ROOT / "orchestrator").parts
        room = parts[0] if len(parts) > 1 else path.stem
        if room == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orchestrator."):
                target = node.module.split(".")[1]
                if target != room and RANKS[target] >= RANKS[room]:
                    upward.append(f"{path.relative_to(ROOT)} imports {node.module}")
    assert upward == []
    assert set(RANKS) == {
        p.stem if p.is_file() else p.name
        for p in (ROOT / "orchestrator").iterdir()
        if p.name not in ("__init__.py", "__pycache__")
    }  # every room is ranked


def orchestrator_rooms(path: Path) -> set[str]:
    """The rooms of orchestrator/ a file imports ("*" for the bare package, which reaches all)."""
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "orchestrator":
            modules = [f"orchestrator.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        else:
            continue
        rooms |= {m.split(".")[1] if "." in m else "*" for m in modules if m.split(".")[0] == "orchestrator"}
    return rooms


def test_kvorch_reads_only_the_lake_and_the_reports():
    reached = {
        str(path.relative_to(ROOT)): orchestrator_rooms(path) for path in sorted((ROOT / "kvorch").rglob("*.py"))
    }
    assert {file: rooms - KVORCH_READS for file, rooms in reached.items() if rooms - KVORCH_READS} == {}
    assert set().union(*reached.values()) == KVORCH_READS <= set(RANKS)


def workers_imports(path: Path) -> set[str]:
    """The ``workers.*`` modules a file imports (module names, dotted)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("workers.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "workers":
                found |= {f"workers.{alias.name}" for alias in node.names}
            elif node.module.startswith("workers."):
                found.add(node.module)
    return found


def test_the_driver_takes_only_settings_from_the_engine_package():
    """Plan types come from workers/plan.py, settings from workers/engine/settings.py; the rest of
    the engine is the actor's business."""
    reached = {
        str(path.relative_to(ROOT)): {m for m in workers_imports(path) if m.startswith("workers.engine")}
        for floor in ("orchestrator", "kvorch")
        for path in sorted((ROOT / floor).rglob("*.py"))
    }
    assert {f: m - {"workers.engine.settings"} for f, m in reached.items() if m - {"workers.engine.settings"}} == {}


def test_workers_have_no_import_circle():
    """Module-level imports between workers/ modules, TYPE_CHECKING ones included, form no cycle."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "workers").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        top = [*tree.body, *(n for block in tree.body if isinstance(block, ast.If) for n in block.body)]
        for node in top:  # module level only: function-local imports break cycles on purpose
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workers"):
                edges.add(node.module)
        graph[module] = edges

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert sorted(m for m in graph if reaches(m, m, {m})) == []

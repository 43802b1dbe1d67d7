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


def workers_imports(path: Path, skip_type_checking: bool = False) -> set[str]:
    """The ``workers.*`` modules a file imports (dotted; ``from workers.contract import plan`` is
    ``workers.contract.plan``), function-local imports included. ``skip_type_checking``: leave out
    imports under ``if TYPE_CHECKING:``, which are annotations, not arrows at run time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    if skip_type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("workers.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("workers"):
            package = ROOT / node.module.replace(".", "/")
            for alias in node.names:
                is_module = (package / f"{alias.name}.py").exists() or (package / alias.name).is_dir()
                found.add(f"{node.module}.{alias.name}" if package.is_dir() and is_module else node.module)
    return found


# Exactly what the driver (orchestrator/, kvorch/, sql/) may import from workers/: the contract
# the two sides share, the press registry, and the entry points of what runs in actors. A new
# entry here is a decision about the boundary (docs/DESIGN.md, "Architecture").
DRIVER_IMPORTS = {
    "workers.contract.configs", "workers.contract.defaults", "workers.contract.errors", "workers.contract.memory",
    "workers.contract.models", "workers.contract.plan", "workers.contract.schema", "workers.contract.settings",
    "workers.contract.tokenization", "workers.contract.scorers",
    "workers.contract.allocation",  # --allocation: parsed, and a file's shares read, by the driver
    "workers.presses",  # the registry: names, parse_method, the Press base
    "workers.presses.kvzap",  # save_surrogate: kvorch kvzap writes the surrogate the press loads
    "workers.actor",  # EvalWorker, the sweep's Ray actor
    "workers.faults",  # the fault-injection variables forwarded to actors
    "workers.studies.head_stats", "workers.studies.kvzap_targets",  # the studies' actors and records
    "workers.studies.qfilters",  # kvorch heads qfilters: sums the actors' query moments, saves the filters
}  # fmt: skip


def test_the_driver_imports_exactly_the_listed_workers_modules():
    reached = {
        module
        for floor in ("orchestrator", "kvorch", "sql")
        for path in sorted((ROOT / floor).rglob("*.py"))
        for module in workers_imports(path)
    }
    assert reached == DRIVER_IMPORTS


# workers/'s rooms, bottom first: a room may import its own modules and rooms of a lower rank.
WORKER_RANKS = {
    "contract": 0, "faults": 0, "progress": 0, "modeling": 1, "presses": 2, "engine": 3, "studies": 3, "actor": 4,
}  # fmt: skip


def test_workers_rooms_import_only_downwards():
    def room(module: str) -> str:
        return module.split(".")[1]

    upward = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / "workers").rglob("*.py"))
        if len(path.relative_to(ROOT / "workers").parts) > 1 or path.stem != "__init__"
        for module in sorted(workers_imports(path, skip_type_checking=True))
        if room(module) != (here := path.relative_to(ROOT / "workers").parts[0].removesuffix(".py"))
        and WORKER_RANKS[room(module)] >= WORKER_RANKS[here]
    ]
    assert upward == []
    assert set(WORKER_RANKS) == {
        p.stem if p.is_file() else p.name
        for p in (ROOT / "workers").iterdir()
        if p.name not in ("__init__.py", "__pycache__")
    }  # every room is ranked


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
                package = ROOT / node.module.replace(".", "/")
                # ``from workers.engine import compiling`` is an arrow to the module, not the package
                modules = [f"{node.module}.{a.name}" for a in node.names if (package / f"{a.name}.py").exists()]
                edges.update(modules or [node.module])
        graph[module] = edges

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert sorted(m for m in graph if reaches(m, m, {m})) == []

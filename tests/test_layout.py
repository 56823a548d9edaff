"""The house plan's import order (DESIGN.md): evolve -> search_spaces -> fitness -> operators, and
dashboards read the run store only. Every import counts, module-level or inside a function: a
function-local import that points up is a cycle too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("evolve", "search_spaces", "fitness", "operators")  # each may import those after it


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_folders_depend_one_way():
    upward = []
    for rank, folder in enumerate(ORDER):
        for path in sorted((ROOT / folder).glob("*.py")):
            for line, module in _imports(path):
                top = module.split(".")[0]
                if top in ORDER and ORDER.index(top) < rank:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not upward, "imports that point up the house plan:\n" + "\n".join(upward)


def test_the_check_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from evolve.engine import Evolution\n")
    assert _imports(module) == [(2, "evolve.engine")]


def test_nothing_imports_the_dashboard():
    """The dashboard reads the run store, so it sits above it: `evoforge dashboard` starts it as
    a program (`python -m dashboards`) rather than importing it."""
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for folder in ORDER for path in sorted((ROOT / folder).glob("*.py"))
             for line, module in _imports(path) if module.split(".")[0] == "dashboards"]
    assert not found, found


def test_dashboards_read_the_run_store_and_nothing_else():
    allowed = {"evolve.store", "evolve.run_report"}
    for path in sorted((ROOT / "dashboards").glob("*.py")):
        for line, module in _imports(path):
            if module.split(".")[0] in ORDER:
                assert module in allowed, f"{path.relative_to(ROOT)}:{line} imports {module}"

"""The package layout issue 19 set up stays: no import cycle between the modules of nas/, profilers/ and
search_spaces/ (deferred imports count), Optuna's private names only in nas/trial_store.py, and no module over
450 lines."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nas", "profilers", "search_spaces")
PRIVATE_OPTUNA = re.compile(r"\._storage\b|\._trial_id\b|\boptuna\._[a-z]")


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {f"{f.parent.name}.{f.stem}": f for package in PACKAGES for f in sorted((root / package).glob("*.py"))
            if f.stem != "__init__"}


def imports(root: Path = ROOT) -> dict[str, set[str]]:
    """Each module's imports of the others, wherever they stand in the file (a deferred import still ties)."""
    known = modules(root)
    edges = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in known and t != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name], path[len(path):] = "open", [name]
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[name] = "done"
        path.pop()
        return None

    for name in sorted(edges):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_module_imports_its_way_back_to_itself():
    assert find_cycle(imports()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_trial_store_touches_optunas_private_names():
    users = {name for name, path in modules().items() if PRIVATE_OPTUNA.search(path.read_text())}
    assert users == {"nas.trial_store"}


def test_no_module_is_over_450_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: size for name, size in sizes.items() if size > 450} == {}

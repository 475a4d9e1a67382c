"""The package's shape, read from its source with `ast`: no import cycle among kvserve's modules, and
imports that go server -> engine -> model -> cache/policies/attention -> kernels, never upwards.

Every import counts, wherever it is: one deferred into a function or under `if TYPE_CHECKING:` is
still a dependency (a factory in a base module importing its subclasses is a cycle all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvserve": ROOT / "kvserve"}

# A module may import its own layer and those below; the layer is its first subpackage's.
LAYERS = {"kvserve": 0, "kvserve.paths": 0, "kvserve.registry": 0, "kvserve.kernels": 1, "kvserve.cache": 2,
          "kvserve.policies": 2, "kvserve.attention": 2, "kvserve.model": 3, "kvserve.engine": 4, "kvserve.eval": 5,
          "kvserve.server": 5, "kvserve.cli": 6, "kvserve.__main__": 6}
# command-line entry points: they may import any layer, and nothing imports them
ENTRY_POINTS = {"kvserve.cli", "kvserve.__main__", "kvserve.kernels.bench", "kvserve.kernels.cpu_bench",
                "kvserve.engine.bench", "kvserve.server.bench"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the kvserve modules it imports anywhere (a package's __init__ counts as a module)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert not node.level, f"{path}: the project imports absolutely"
                base = node.module or ""
                # `from package import module` imports the module; `from module import name` the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in known and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> int:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:end])) in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_the_graph_sees_the_packages_imports() -> None:
    graph = import_graph()
    assert "kvserve.kernels.paged_decode" in graph and "kvserve.server.api_server" in graph
    # `from a.b import name` edges
    assert "kvserve.engine.llm_engine" in graph["kvserve.engine.async_engine"]
    assert "kvserve.kernels.cpu_library" in graph["kvserve.kernels.paged_decode"]


def test_find_cycle_finds_a_cycle_and_only_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "d"}, "b": set(), "d": {"d2"}, "d2": {"d"}}) == ["d", "d2", "d"]


def test_no_import_cycle_inside_kvserve() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_imports_never_go_upwards() -> None:
    upwards = [f"{module} -> {target}" for module, targets in import_graph().items() if module not in ENTRY_POINTS
               for target in targets if layer(target) > layer(module)]
    assert not upwards, "imports from a higher layer:\n" + "\n".join(sorted(upwards))


def test_nothing_imports_an_entry_point() -> None:
    importers = [f"{module} -> {target}" for module, targets in import_graph().items()
                 for target in targets & ENTRY_POINTS if module not in ENTRY_POINTS]
    assert not importers, "\n".join(importers)

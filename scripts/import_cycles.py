"""Find import circles between orch's own modules, the ones hidden in functions included.

    .venv/bin/python scripts/import_cycles.py                 # state/ worker/ jobs/ orchestrator/
    .venv/bin/python scripts/import_cycles.py --root DIR jobs # other root, other packages

Every `import` and `from ... import` in a module is an edge, wherever it sits: at the top, in a
function, under `if TYPE_CHECKING:` (a circle that only the type checker walks still ties the
two files together). Relative imports are resolved; `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg` itself. Each strongly connected group of modules
is printed with one shortest circle through it, each step with its file and line. Exit status:
0 when there is no circle, 1 when there is one.

`importlib.import_module("a.b")` with a literal name counts too; a name computed at run time
(`cli`'s command discovery) is not seen.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("state", "worker", "jobs", "orchestrator")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    """One import statement: `importer` imports `imported` at `path:line`."""

    importer: str
    imported: str
    path: Path
    line: int


def module_names(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module under the given packages: dotted name -> file (`pkg/__init__.py` is `pkg`)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve_base(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module a `from X import ...` names (None if it climbs above the root)."""
    if node.level == 0:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    climb = node.level - 1
    if climb > len(parts) - 1:
        return None
    base = parts[: len(parts) - climb]
    if node.module:
        base.append(node.module)
    return ".".join(base)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The nearest of `name` and its parents that is one of our modules."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_import_call(node: ast.AST) -> bool:
    """`importlib.import_module("a.b")` or `__import__("a.b")` with a literal name."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id in {"import_module", "__import__"}
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import between our modules, module-level or not."""
    edges: list[Edge] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_base(module, is_package, node)
                if base is None:
                    continue
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            elif _is_import_call(node):
                targets = [node.args[0].value]  # type: ignore[attr-defined]
            for target in targets:
                imported = _known(target, modules)
                if imported is not None and imported != module:
                    edges.append(Edge(module, imported, path, node.lineno))
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; only the groups of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(iter(children), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def shortest_cycle(graph: dict[str, set[str]], group: Sequence[str]) -> list[str]:
    """A shortest circle through the group's first module, staying inside the group."""
    members = set(group)
    start = group[0]
    previous: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return [start]  # unreachable for a strongly connected group


def find_cycles(root: Path, packages: Iterable[str]) -> tuple[list[list[str]], list[Edge]]:
    """(the circular groups, every edge) for the packages under `root`."""
    modules = module_names(root, packages)
    edges = import_edges(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for edge in edges:
        graph[edge.importer].add(edge.imported)
    return strongly_connected(graph), edges


def format_cycles(groups: list[list[str]], edges: list[Edge], root: Path) -> str:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
        where.setdefault((edge.importer, edge.imported), edge)
    lines: list[str] = []
    for group in groups:
        lines.append(f"circle among {len(group)} modules: {', '.join(group)}")
        cycle = shortest_cycle(graph, group)
        for importer, imported in zip(cycle, cycle[1:], strict=False):
            edge = where[(importer, imported)]
            rel = edge.path.relative_to(root) if edge.path.is_relative_to(root) else edge.path
            lines.append(f"  {importer} -> {imported}  ({rel}:{edge.line})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES))
    parser.add_argument("--root", type=Path, default=REPO, help="the dir holding the packages")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    groups, edges = find_cycles(root, args.packages)
    if not groups:
        print(f"no import circles in {', '.join(args.packages)}")
        return 0
    print(format_cycles(groups, edges, root))
    return 1


if __name__ == "__main__":
    sys.exit(main())

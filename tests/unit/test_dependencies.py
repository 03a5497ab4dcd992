"""Every dependency pyproject.toml declares earns its place (issue 15): the code imports it, or a
comment beside it (on its line or the comment lines just above) says which library or tool uses
it and for what."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

#: The import name of a distribution whose name differs from it.
IMPORT_NAME = {"import-linter": "importlinter", "pytest-timeout": "pytest_timeout"}
SOURCES = ("orchestrator", "worker", "jobs", "state", "tests", "scripts")


def declared(text: str) -> list[tuple[str, bool]]:
    """(distribution, has a comment) for each entry of the dependency lists."""
    found = []
    in_list = False
    above = False
    for line in text.splitlines():
        stripped = line.strip()
        if re.match(r"^(dependencies|worker|report|dev) = \[", stripped):
            in_list, above = True, False
            inline = re.findall(r'"([A-Za-z0-9_.-]+)[^"]*"', stripped.split("[", 1)[1])
            found += [(name, "#" in stripped) for name in inline]
            if stripped.endswith("]"):
                in_list = False
            continue
        if not in_list:
            continue
        if stripped.startswith("]"):
            in_list = False
            continue
        if stripped.startswith("#"):
            above = True
            continue
        match = re.match(r'^"([A-Za-z0-9_.-]+)', stripped)
        if match:
            found.append((match.group(1), above or "#" in stripped))
        above = False
    return found


def imported_names() -> set[str]:
    names: set[str] = set()
    for folder in SOURCES:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def test_every_dependency_is_imported_or_says_who_uses_it() -> None:
    deps = declared((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    names = [name for name, _ in deps]
    for expected in ("pydantic", "fabric", "torch", "accelerate", "lm_eval", "import-linter"):
        assert expected in names, names  # the parser reads all four lists
    imported = imported_names()
    unexplained = [
        name
        for name, commented in deps
        if not commented and IMPORT_NAME.get(name, name.replace("-", "_")) not in imported
    ]
    assert unexplained == [], (
        f"declared, imported nowhere, no comment saying who uses it: {unexplained}"
    )


def test_the_check_sees_an_unexplained_one() -> None:
    text = 'dependencies = [\n  "pydantic>=2",\n  "left-pad>=1",\n  # used by x\n  "y>=1",\n]\n'
    assert declared(text) == [("pydantic", False), ("left-pad", False), ("y", True)]

"""The import contracts of pyproject.toml and scripts/import_cycles.py: kept by the tree as it is,
broken by one deliberate back-import (the bottom layer reaching up to the CLI commands, and in the
worker the run context reaching up to the lifecycle from inside a function); run by
scripts/test.sh; drawn layer by layer in docs/architecture.md."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's venv is 3.11
    import tomli as tomllib

sys.path.insert(0, str(REPO / "scripts"))
import import_cycles

PACKAGES = ("state", "worker", "jobs", "orchestrator")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the four packages and pyproject.toml, to break on purpose."""
    for name in PACKAGES:
        shutil.copytree(
            REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.skip("lint-imports is not installed (pip install -e '.[dev]')")
    # The copy comes first on the path, ahead of the editable install of this checkout.
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def add_back_import(root: Path) -> None:
    """orchestrator/config.py, a leaf, importing the CLI commands that sit on top of it."""
    path = root / "orchestrator" / "config.py"
    text = path.read_text(encoding="utf-8")
    anchor = "from orchestrator.alerturls import check_urls\n"
    assert anchor in text
    path.write_text(
        text.replace(anchor, anchor + "from orchestrator.commands import launch as _cli\n"),
        encoding="utf-8",
    )


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    res = lint_imports(tree)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BROKEN" not in res.stdout
    groups, _ = import_cycles.find_cycles(tree, PACKAGES)
    assert groups == []


def test_a_back_import_breaks_the_layers_and_the_cycle_checks(tree: Path) -> None:
    add_back_import(tree)
    res = lint_imports(tree)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "orchestrator's layers, from the CLI down BROKEN" in res.stdout
    assert "orchestrator.config is not allowed to import orchestrator.commands" in res.stdout
    assert "no import circles BROKEN" in res.stdout

    groups, edges = import_cycles.find_cycles(tree, PACKAGES)
    circle = next(g for g in groups if "orchestrator.config" in g)
    assert "orchestrator.commands.launch" in circle
    text = import_cycles.format_cycles(groups, edges, tree)
    assert "orchestrator/config.py" in text
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "import_cycles.py"),
            "--root",
            str(tree),
            *PACKAGES,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1 and "orchestrator.config" in out.stdout


def test_function_level_and_relative_imports_count(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def late():\n    from ..a import x\n    return x\n")
    (pkg / "c.py").write_text("import importlib\nM = importlib.import_module('pkg.a')\n")
    groups, edges = import_cycles.find_cycles(tmp_path, ["pkg"])
    assert groups == [["pkg.a", "pkg.sub.b"]]
    assert ("pkg.c", "pkg.a") in {(e.importer, e.imported) for e in edges}


def test_a_function_level_back_import_in_the_worker_breaks_its_layers(tree: Path) -> None:
    """worker/context.py (below the tasks) reaching up to the lifecycle, hidden in a function:
    the old lifecycle <-> train/probe circle come back."""
    path = tree / "worker" / "context.py"
    path.write_text(
        path.read_text(encoding="utf-8")
        + "\n\ndef _late():\n    from worker.lifecycle import execute\n\n    return execute\n",
        encoding="utf-8",
    )
    res = lint_imports(tree)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "worker's layers, from the CLI down BROKEN" in res.stdout
    assert "worker.context is not allowed to import worker.lifecycle" in res.stdout

    groups, edges = import_cycles.find_cycles(tree, PACKAGES)
    circle = next(g for g in groups if "worker.context" in g)
    assert "worker.lifecycle" in circle
    assert "worker/context.py" in import_cycles.format_cycles(groups, edges, tree)


def test_scripts_test_sh_runs_both_checks() -> None:
    lines = [
        line.split("#")[0].strip()
        for line in (REPO / "scripts" / "test.sh").read_text(encoding="utf-8").splitlines()
    ]
    assert "lint-imports" in lines
    assert "python scripts/import_cycles.py" in lines


def _drawn_layers(doc: str, heading: str) -> list[str]:
    """The first lines of each layer in the code block that follows `heading`: the names."""
    block = doc.split(heading, 1)[1].split("```", 2)[1]
    # a layer's line: its names, then two or more spaces and the description (or nothing, when
    # the names alone fill the line and the description follows on the next, indented, line)
    return [re.split(r"\s{2,}", line.strip())[0] for line in block.splitlines() if line[:1].strip()]


def _parts(drawn: str) -> list[str]:
    return [p.strip().rstrip("/") for p in re.split(r"[|,]", drawn) if p.strip()]


@pytest.mark.parametrize(
    ("contract", "heading"),
    [
        ("orchestrator's layers, from the CLI down", "## The controller's layers"),
        ("worker's layers, from the CLI down", "The worker's layers"),
    ],
)
def test_docs_draw_the_contracts_layers_in_order(contract: str, heading: str) -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (layers,) = [
        c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["name"] == contract
    ]
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    drawn = [_parts(line) for line in _drawn_layers(doc, heading)]
    flat = [name for line in drawn for name in line]
    wanted = [[p.strip() for p in layer.split("|")] for layer in layers]
    assert sorted(flat) == sorted(name for layer in wanted for name in layer), (flat, wanted)
    # Each drawn line is one layer, or adjacent layers drawn together (`__main__, cli`).
    position = {name: i for i, layer in enumerate(wanted) for name in layer}
    order = [sorted({position[n] for n in line}) for line in drawn]
    assert [i for line in order for i in line] == list(range(len(wanted))), order


def _function_level_imports(root: Path) -> list[tuple[Path, int, bool]]:
    """(file, line, says why) for every import inside a function of the four packages. It says
    why with a comment on its own lines or on the line above its block of imports."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            tree = ast.parse("\n".join(lines))
            starts = {}
            for func in ast.walk(tree):
                if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(func):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        starts[node.lineno] = node.end_lineno or node.lineno
            ends = {end: start for start, end in starts.items()}
            for start, end in sorted(starts.items()):
                first = start
                while first - 1 in ends:  # the block of imports this one belongs to
                    first = ends[first - 1]
                own = any("#" in lines[i - 1] for i in range(start, end + 1))
                above = first >= 2 and lines[first - 2].strip().startswith("#")
                found.append((path, start, own or above))
    return found


def test_every_function_level_import_says_why(tmp_path: Path) -> None:
    """A function-level import stays only where it buys start-up time, and says so (issue 15)."""
    found = _function_level_imports(REPO)
    assert found, "the walk finds the lazy imports"
    silent = [f"{p.relative_to(REPO)}:{line}" for p, line, why in found if not why]
    assert silent == [], "function-level imports without a comment saying why: " + ", ".join(silent)

    # The check sees a silent one.
    pkg = tmp_path / "orchestrator"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n    import json\n\n    return json\n")
    (pkg / "n.py").write_text("def f():\n    # lazy, for start-up time\n    import json\n")
    assert [(p.name, line, why) for p, line, why in _function_level_imports(tmp_path)] == [
        ("m.py", 2, False),
        ("n.py", 3, True),
    ]


STARTUP_PROBE = """
import sys
{imports}
heavy = {heavy!r}
print(" ".join(sorted(h for h in heavy if h in sys.modules)))
"""


@pytest.mark.parametrize(
    ("imports", "heavy"),
    [
        # every `orch` command builds the whole parser first (orchestrator/cli.py)
        (
            "import orchestrator.cli as c\nc.build_parser()",
            ["paramiko", "fabric", "apprise", "apscheduler", "torch", "transformers", "matplotlib"],
        ),
        # `python -m worker exec` and --help: the lifecycle without a task
        ("import worker.cli, worker.lifecycle", ["torch", "transformers", "datasets"]),
    ],
)
def test_the_lazy_imports_keep_start_up_light(imports: str, heavy: list[str]) -> None:
    """What the function-level imports buy: these entry points load none of the heavy libraries."""
    out = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE.format(imports=imports, heavy=heavy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "", f"loaded at start-up: {out.stdout.strip()}"

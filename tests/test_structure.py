"""The layering holds: gradwatch's own modules import each other without a cycle, and no
module but the monitor's reads the monitor's private state.

Pure ``ast`` over the source tree: nothing here imports the package, so these run in
milliseconds and see every import, including lazy ones inside functions and those under
``if TYPE_CHECKING:`` (a cycle through either is still a cycle in the design).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (pyproject's package-dir remap).
PACKAGE_DIRS = {"gradwatch": "gradwatch", "integrations": "gradwatch.integrations"}
MONITOR_MODULE = "gradwatch.monitor"
MONITOR_NAMES = {"monitor", "_monitor"}


@dataclass(frozen=True)
class Source:
    name: str  # dotted module name; a package's ``__init__`` is the package itself
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package a relative import starts from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    @property
    def where(self) -> str:
        return self.path.relative_to(REPO).as_posix()


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    kind: str  # "top level", "lazy" (inside a function) or "TYPE_CHECKING"


def sources() -> dict[str, Source]:
    """Every module under the package folders, by module name."""
    found = {}
    for folder, package in PACKAGE_DIRS.items():
        root = REPO / folder
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            found[name] = Source(name, path, is_package)
    return found


def _known_prefix(name: str, known: set[str]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def resolve(node: ast.Import | ast.ImportFrom, source: Source, known: set[str]) -> set[str]:
    """The modules of ours an import statement names (no implicit parent packages).

    ``from .a import b`` is ``<package>.a.b`` if that is a module, else ``<package>.a``;
    ``from . import x`` is ``<package>.x`` if that is a module, else the package's
    ``__init__`` (``from . import __version__``).
    """
    if isinstance(node, ast.Import):
        targets = {_known_prefix(alias.name, known) for alias in node.names}
        return targets - {None}
    if node.level:
        parts = source.package.split(".")
        up = node.level - 1
        if up >= len(parts):  # beyond the top-level package: an ImportError at run time
            return set()
        base = ".".join(parts[: len(parts) - up])
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    targets = set()
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        targets.add(sub if sub in known else _known_prefix(module, known))
    return targets - {None}


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, source: Source, known: set[str]) -> None:
        self.source, self.known = source, known
        self.edges: list[Edge] = []
        self._functions = 0
        self._type_checking = 0

    def _add(self, node: ast.Import | ast.ImportFrom) -> None:
        kind = ("TYPE_CHECKING" if self._type_checking else
                "lazy" if self._functions else "top level")
        for target in sorted(resolve(node, self.source, self.known)):
            if target != self.source.name:
                self.edges.append(Edge(target, node.lineno, kind))

    visit_Import = visit_ImportFrom = _add

    def _function(self, node: ast.AST) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._type_checking += 1
        for child in node.body:
            self.visit(child)
        self._type_checking -= 1
        for child in node.orelse:
            self.visit(child)


def import_graph(found: dict[str, Source]) -> dict[str, list[Edge]]:
    """Module -> the imports of our modules it makes, with line and kind."""
    known = set(found)
    graph = {}
    for name, source in found.items():
        collector = _ImportCollector(source, known)
        collector.visit(ast.parse(source.path.read_text(encoding="utf-8"), str(source.path)))
        graph[name] = collector.edges
    return graph


def cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Every elementary cycle, each starting (and ending) at its smallest module name.

    A plain depth-first search from each module over larger modules only: exponential
    in theory, instant on a graph of a few dozen modules that is nearly acyclic.
    """
    succ = {name: sorted({e.target for e in edges}) for name, edges in graph.items()}
    found = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in succ.get(path[-1], ()):
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                walk(start, [*path, nxt])

    for start in sorted(succ):
        walk(start, [start])
    return found


def _describe(cycle: list[str], graph: dict[str, list[Edge]], found: dict[str, Source]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        where = ", ".join(f"{found[a].where}:{e.line} ({e.kind})"
                          for e in graph[a] if e.target == b)
        lines.append(f"    {a} -> {b}: {where}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the rules
@pytest.mark.parametrize("module, is_package, code, expected", [
    ("gradwatch.run_record", False, "from . import __version__", {"gradwatch"}),
    ("gradwatch.monitor", False, "from . import functional as F", {"gradwatch.functional"}),
    ("gradwatch.monitor", False, "from .records import ACTIONS", {"gradwatch.records"}),
    ("gradwatch.cli", False, "from .report import render", {"gradwatch.report.render"}),
    ("gradwatch.cli", False, "from .report import nothing", {"gradwatch.report"}),
    ("gradwatch.report", True, "from . import render", {"gradwatch.report.render"}),
    ("gradwatch.report.render", False, "from .. import __version__", {"gradwatch"}),
    ("gradwatch.report.render", False, "from ..records import ACTIONS", {"gradwatch.records"}),
    ("gradwatch.integrations.lightning", False, "import gradwatch", {"gradwatch"}),
    ("gradwatch.integrations.lightning", False, "from . import huggingface",
     {"gradwatch.integrations.huggingface"}),
    ("gradwatch.integrations.lightning", False, "from gradwatch.records import ACTIONS",
     {"gradwatch.records"}),
    ("gradwatch.integrations.lightning", False, "import gradwatch.integrations.huggingface",
     {"gradwatch.integrations.huggingface"}),
    ("gradwatch.integrations", True, "from gradwatch import attach", {"gradwatch"}),
    ("gradwatch.monitor", False, "import torch.nn\nfrom torch import nn", set()),
])
def test_import_resolution(module, is_package, code, expected):
    known = {"gradwatch", "gradwatch.functional", "gradwatch.records", "gradwatch.report",
             "gradwatch.report.render", "gradwatch.integrations",
             "gradwatch.integrations.huggingface", "gradwatch.integrations.lightning"}
    source = Source(module, REPO / "x.py", is_package)
    targets = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            targets |= resolve(node, source, known)
    assert targets == expected


def test_lazy_and_type_checking_imports_count():
    code = ("from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .records import ACTIONS\n"
            "def f():\n    from .functional import x\n"
            "from .config import MonitorConfig\n")
    path = REPO / "gradwatch" / "monitor.py"
    collector = _ImportCollector(Source("gradwatch.monitor", path, False),
                                 {"gradwatch.records", "gradwatch.functional", "gradwatch.config"})
    collector.visit(ast.parse(code))
    assert collector.edges == [Edge("gradwatch.records", 3, "TYPE_CHECKING"),
                               Edge("gradwatch.functional", 5, "lazy"),
                               Edge("gradwatch.config", 6, "top level")]


def test_cycle_listing():
    def graph(**succ):
        return {a: [Edge(b, 1, "top level") for b in bs] for a, bs in succ.items()}

    assert cycles(graph(a=["b"], b=["c"], c=[])) == []
    assert cycles(graph(a=["b"], b=["c", "a"], c=["a"])) == [["a", "b", "a"],
                                                            ["a", "b", "c", "a"]]


# ---------------------------------------------------------------------- the package
def test_source_tree_is_parsed():
    found = sources()
    assert {"gradwatch", MONITOR_MODULE, "gradwatch.integrations"} <= set(found)
    graph = import_graph(found)
    assert any(e.target == MONITOR_MODULE for e in graph["gradwatch"])


def test_no_import_cycles():
    found = sources()
    graph = import_graph(found)
    loops = cycles(graph)
    if loops:
        pytest.fail(f"{len(loops)} import cycle(s) among gradwatch's modules:\n"
                    + "\n".join(_describe(c, graph, found) for c in loops), pytrace=False)


def test_only_the_monitor_reads_its_private_state():
    reads = []
    for name, source in sources().items():
        if name == MONITOR_MODULE:
            continue
        tree = ast.parse(source.path.read_text(encoding="utf-8"), str(source.path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            base = node.value
            final = (base.id if isinstance(base, ast.Name) else
                     base.attr if isinstance(base, ast.Attribute) else None)
            if final in MONITOR_NAMES:
                reads.append(f"{source.where}:{node.lineno}: {final}.{node.attr}")
    if reads:
        pytest.fail("private state of the monitor used outside gradwatch/monitor.py "
                    "(give the monitor a public accessor):\n" + "\n".join(reads), pytrace=False)


def test_the_readme_fault_table_names_tests_that_exist():
    # The README's table of what is promised when things go wrong cites a test for
    # every row; a test renamed or removed must not leave the table pointing nowhere.
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## What is promised when things go wrong", 1)[1].split("\n## ", 1)[0]
    cited = 0
    for row in table.splitlines():
        if not row.startswith("| ") or row.startswith("| when"):
            continue
        current = None
        for ref in re.findall(r"`([\w./]*::\w+|test_\w+\.py)`", row.split("|")[3]):
            path, _, name = ref.partition("::")
            current = path or current
            source = (REPO / "tests" / current).read_text(encoding="utf-8")
            if name:
                assert re.search(rf"^def {name}\(", source, re.M), f"{current}::{name}"
            cited += 1
    assert cited >= 30

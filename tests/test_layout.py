"""
The rules the layout keeps (docs/architecture.md), checked on the source:
no import cycle (type-only and function-level imports included), no module
over 600 lines, the web layer blind to the server, the library blind to the
CLI, and the thread bridge in the embedded layer only.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "trainstream"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every trainstream module ``path`` imports, wherever the import stands."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("trainstream"):
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("trainstream"))
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name, "trainstream"} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


class LayoutTests(SynchronousTestCase):
    def test_no_import_cycle(self) -> None:
        self.assertEqual(cycles(graph()), [])

    def test_cycles_are_found(self) -> None:
        """The check itself: a cycle of two is reported."""
        self.assertEqual(cycles({"a": {"b"}, "b": {"a"}, "c": set()}), [["a", "b"]])

    def test_no_module_over_600_lines(self) -> None:
        long = {
            str(path.relative_to(PACKAGE.parent)): n
            for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 600
        }
        self.assertEqual(long, {})

    def test_web_never_sees_the_server(self) -> None:
        forbidden = {"trainstream.server", "trainstream.embedded", "trainstream.listeners"}
        for name, deps in graph().items():
            if name.startswith("trainstream.web"):
                self.assertEqual(deps & forbidden, set(), name)

    def test_library_never_imports_the_cli(self) -> None:
        def cli(module: str) -> bool:
            return module == "trainstream.cli" or module.startswith("trainstream.cli.")

        for name, deps in graph().items():
            if not cli(name) and name != "trainstream.__main__":
                self.assertEqual({d for d in deps if cli(d)}, set(), name)

    def test_only_the_embedded_layer_bridges_threads(self) -> None:
        bridges = {
            str(path.relative_to(PACKAGE.parent))
            for path in PACKAGE.rglob("*.py")
            if any(
                word in path.read_text(encoding="utf-8")
                for word in ("import crochet", "blockingCallFromThread")
            )
        }
        self.assertEqual(bridges, {"trainstream/embedded.py"})

"""The shape of the house: no import cycles, and the protocol core loads no I/O.

* Import cycles: a graph of every module-level import in ``bridge/``,
  ``telephony/`` and ``metrics/`` (``import a.b``, ``from a import b``,
  ``from . import b``, ``from .a import b``; imports inside functions run
  later and imports under ``if TYPE_CHECKING:`` never run, so neither
  counts), searched for a cycle. A second, stricter check also counts the
  ``TYPE_CHECKING`` imports: a module that names its caller's type to call
  back into it (the old ``session`` -> ``server``) is the same tangle even
  though it imports fine. The checker itself is tested on small synthetic
  packages, so a real cycle is known to fail it.
* Sans-I/O: importing each codec / state machine in a fresh interpreter
  loads neither ``asyncio`` nor ``aiohttp``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "telephony", "metrics")

#: Import edges allowed for now, each with the reason. Keep these empty when you can.
KNOWN_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()
KNOWN_TYPE_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()


# ------------------------------------------------------------------ checker

def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_statements(body: list[ast.stmt], type_checking: bool) -> list[ast.stmt]:
    """Statements that run when the module is imported (not function bodies,
    not ``if TYPE_CHECKING:`` blocks unless ``type_checking``; class bodies
    and try/if/with blocks do run)."""
    out: list[ast.stmt] = []
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        out.append(stmt)
        if isinstance(stmt, ast.If):
            if type_checking or not _is_type_checking(stmt.test):
                out += _import_time_statements(stmt.body, type_checking)
            out += _import_time_statements(stmt.orelse, type_checking)
        elif isinstance(stmt, ast.Try):
            for block in (stmt.body, stmt.orelse, stmt.finalbody, *[h.body for h in stmt.handlers]):
                out += _import_time_statements(block, type_checking)
        elif isinstance(stmt, (ast.With, ast.ClassDef)):
            out += _import_time_statements(stmt.body, type_checking)
    return out


def import_graph(root: Path, packages: tuple[str, ...], *, type_checking: bool = False) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports while it is being imported
    (with ``type_checking``, also those it imports only for the type checker)."""
    files = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def add(src: str, target: str) -> None:
        # The target module if it exists, else the deepest existing package that holds the name.
        while target and target not in files:
            target = target.rpartition(".")[0]
        if target and target != src:
            graph[src].add(target)

    for name, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for stmt in _import_time_statements(tree.body, type_checking):
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    add(name, alias.name)
            elif isinstance(stmt, ast.ImportFrom):
                if stmt.level:
                    base_parts = name.split(".") if is_package else name.split(".")[:-1]
                    base_parts = base_parts[: len(base_parts) - (stmt.level - 1)]
                    base = ".".join(base_parts + ([stmt.module] if stmt.module else []))
                else:
                    base = stmt.module or ""
                add(name, base)  # the package's __init__ runs first
                for alias in stmt.names:
                    if f"{base}.{alias.name}" in files:  # `from pkg import submodule`
                        add(name, f"{base}.{alias.name}")
    return graph


def find_cycle(graph: dict[str, set[str]], allowed: frozenset[tuple[str, str]] = frozenset()) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``. Edges in ``allowed`` are ignored."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if (node, nxt) in allowed:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


# -------------------------------------------------------- checker, checked

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files", [
    {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n", "pkg/b.py": "from . import a\n"},
    {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "from .c import x\n",
     "pkg/c.py": "from pkg.a import y\n"},
    {"pkg/__init__.py": "from pkg.sub.mod import X\n", "pkg/sub/__init__.py": "",
     "pkg/sub/mod.py": "from ... import pkg\nfrom .. import other\n", "pkg/other.py": "import pkg\n"},
    {"pkg/__init__.py": "", "pkg/a.py": "try:\n    from pkg.b import x\nexcept ImportError:\n    pass\n",
     "pkg/b.py": "class K:\n    from pkg import a\n"},
], ids=["from-dot", "three-modules", "package-init", "try-and-class-body"])
def test_the_checker_finds_a_real_cycle(tmp_path: Path, files: dict[str, str]) -> None:
    graph = import_graph(_package(tmp_path, files), ("pkg",))
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) >= 3, (cycle, graph)


def test_the_checker_ignores_imports_that_do_not_run_at_import_time(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                     "def later():\n    from pkg import a\n"),
    }
    graph = import_graph(_package(tmp_path, files), ("pkg",))
    assert graph["pkg.a"] == {"pkg", "pkg.b"}
    assert find_cycle(graph) is None
    assert find_cycle(import_graph(tmp_path, ("pkg",), type_checking=True)) == ["pkg.a", "pkg.b", "pkg.a"]
    # ... and an allowed edge is exactly one edge, not a blanket pass.
    files["pkg/c.py"] = "from pkg import a\n"
    files["pkg/b.py"] += "from pkg import c\n"
    graph = import_graph(_package(tmp_path, files), ("pkg",))
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert find_cycle(graph, frozenset({("pkg.c", "pkg.a")})) is None
    assert find_cycle(graph, frozenset({("pkg.a", "pkg.c")})) is not None


# ---------------------------------------------------------------- the house

@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-type-checking"])
def test_no_import_cycle_in_the_house(type_checking: bool) -> None:
    graph = import_graph(ROOT, PACKAGES, type_checking=type_checking)
    assert "bridge.session" in graph["bridge.server"], "the graph sees the server's imports"
    known = KNOWN_TYPE_CYCLE_EDGES if type_checking else KNOWN_CYCLE_EDGES
    cycle = find_cycle(graph, known)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    for src, dst in known:
        assert dst in graph[src], f"known exception {src} -> {dst} no longer exists: remove it"


SANS_IO_MODULES = ("bridge.call", "bridge.playout", "telephony.media", "bridge.cartesia.protocol",
                   "bridge.agent.protocol", "bridge.cartesia.stt_protocol", "bridge.hearing",
                   "bridge.agent.relay_settings", "telephony.dtmf_tones")


@pytest.mark.parametrize("module", SANS_IO_MODULES)
def test_the_protocol_core_loads_no_event_loop_and_no_http_stack(module: str) -> None:
    probe = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
             "print(json.dumps([m for m in ('asyncio', 'aiohttp') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe, module], capture_output=True, text=True, cwd=ROOT,
                         check=True, timeout=60)
    assert json.loads(out.stdout) == [], f"importing {module} loads {out.stdout.strip()}"


def test_the_sans_io_probe_sees_asyncio_when_it_is_loaded() -> None:
    probe = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
             "print(json.dumps([m for m in ('asyncio', 'aiohttp') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe, "bridge.session"], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=60)
    assert json.loads(out.stdout) == ["asyncio", "aiohttp"]

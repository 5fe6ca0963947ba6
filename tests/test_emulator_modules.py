"""The emulator's module seams: no import cycle, no private name across modules, no Twilio fast path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bridge" / "cartesia" / "emulator"
MAX_LINES = 500


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def local_imports(tree: ast.Module) -> set[str]:
    """Sibling modules imported at module level or inside functions (``from .x import``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
    return out


def test_no_import_cycle_inside_the_emulator() -> None:
    graph = {name: local_imports(tree) - {name} for name, tree in modules().items()}
    graph.pop("__init__")  # the package facade imports everything and is imported by no module
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_private_name_crosses_a_module() -> None:
    offences: list[str] = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                offences += [f"{name}: imports {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    offences.append(f"{name}:{node.lineno}: .{node.attr} on {ast.unparse(owner)}")
    assert offences == []


def test_the_emulator_does_not_import_the_bridges_twilio_fast_path() -> None:
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "inline_ws" not in (node.module or ""), name
                assert all(a.name != "inline_ws" for a in node.names), name


def test_no_emulator_module_is_over_the_size_limit() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_the_emulators_constants_load_without_aiohttp_or_the_server() -> None:
    """The bridge's configuration may share the voice ids, models and version rules without the server."""
    code = (
        "import sys\n"
        "from bridge.cartesia.emulator.voices import DEFAULT_VOICE_ID\n"
        "from bridge.cartesia.emulator import MODEL_IDS, VERSIONS, EmulatorSettings\n"
        "print(sorted(m for m in ('aiohttp', 'bridge.cartesia.emulator.server') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"

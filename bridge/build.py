"""The optional mypyc build: which modules it compiles, and which of them this process runs compiled.

``COMPILED_MODULES`` is the one list: ``setup.py`` compiles it (with ``MEDIA_BRIDGE_COMPILE=1``), the
bridge logs at start how many of them it runs compiled (``bridge_started``: ``compiled_modules``),
and ``python -m bridge.build --require-compiled`` (CI's compiled suite, the image build) fails
naming any listed module that would be imported from its ``.py``. Standard library only, so
``setup.py`` can read it before the project's dependencies are installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
from typing import Final

#: Why these: they are the per-message hot path (every Twilio media frame, every Cartesia chunk and
#: timestamp, every agent token goes through them), they are sans-I/O (plain functions and classes,
#: no sockets or monkey-patched library internals that mypyc cannot compile), and they pass
#: ``mypy --strict``. Add a module here only if the full suite passes on the compiled build.
COMPILED_MODULES: Final = (
    "telephony.media",
    "telephony.stream_socket",
    "bridge.playout",
    "bridge.histogram_batch",
    "bridge.hearing",
    "bridge.call",
    "bridge.session",
    "bridge.cartesia.protocol",
    "bridge.cartesia.contexts",
    "bridge.agent.protocol",
    "bridge.wsframe",
)


def source_paths() -> list[str]:
    """``COMPILED_MODULES`` as paths relative to the repository root (what mypyc takes)."""
    return [name.replace(".", "/") + ".py" for name in COMPILED_MODULES]


def interpreted_modules() -> list[str]:
    """The listed modules that this interpreter would import from source, not from an extension
    (found without importing them)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    interpreted = []
    for name in COMPILED_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not (spec.origin or "").endswith(suffixes):
            interpreted.append(name)
    return interpreted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.build", description=__doc__.splitlines()[0])
    parser.add_argument("--require-compiled", action="store_true",
                        help="exit 1 unless every listed module is imported from its compiled extension")
    args = parser.parse_args(argv)
    interpreted = interpreted_modules()
    print(f"compiled: {len(COMPILED_MODULES) - len(interpreted)} of {len(COMPILED_MODULES)} listed modules"
          + (f"; from source: {', '.join(interpreted)}" if interpreted else ""))
    if not args.require_compiled:
        return 0
    if interpreted:
        return 1
    # Found is not loaded: import each one (an extension without mypyc's shared library fails here).
    for name in COMPILED_MODULES:
        importlib.import_module(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

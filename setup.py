"""Optional mypyc build of the hot modules; all metadata stays in pyproject.toml.

Without ``MEDIA_BRIDGE_COMPILE=1`` this is a plain ``setup()``: the pure-Python distribution, and
mypyc is not imported. With it, the modules in ``COMPILED_MODULES`` are compiled by mypyc into C
extensions placed next to their ``.py`` files (plus one shared ``*__mypyc`` library at the top
level); Python imports the extension in preference to the source. Compiling is opt-in and needs
mypy and setuptools>=77 in the building environment itself::

    pip install "mypy>=1.11" "setuptools>=77"
    MEDIA_BRIDGE_COMPILE=1 pip install --no-build-isolation .
    MEDIA_BRIDGE_COMPILE=1 python setup.py build_ext --inplace     # in a copy: deploy/compile-in-place.sh

mypyc checks annotations at run time (a value of the wrong type raises TypeError where the
interpreter would carry on), so every listed module must be honestly typed: CI runs the whole test
suite on the compiled build as well (.ci/run, third step).
"""

from __future__ import annotations

import os
import runpy
import sys

from setuptools import setup

#: The modules compiled with mypyc (paths relative to this file). The list itself, and why these,
#: is ``bridge/build.py`` (read without importing the package, whose dependencies may be missing).
_HERE = os.path.dirname(os.path.abspath(__file__))
COMPILED_MODULES: list[str] = runpy.run_path(os.path.join(_HERE, "bridge", "build.py"))["source_paths"]()

#: Set to 1 to compile; anything else (or unset) builds the pure-Python distribution.
COMPILE_ENV = "MEDIA_BRIDGE_COMPILE"
#: mypyc's C optimisation level (-O3): the build is for speed, and size is not a concern here.
OPT_LEVEL = "3"

MISSING_MYPYC = (
    f"{COMPILE_ENV}=1 asks for the mypyc build, but mypyc cannot be imported in this environment "
    f"({sys.executable}): pip install mypy setuptools>=77, then build with --no-build-isolation "
    "(an isolated build environment has neither)."
)


def compile_requested() -> bool:
    return os.environ.get(COMPILE_ENV, "") == "1"


def compiled_extensions() -> list[object]:
    """The mypyc extensions for ``COMPILED_MODULES``; exits with a clear message if mypyc is missing."""
    try:
        from mypyc.build import mypycify
    except ImportError as e:
        raise SystemExit(f"{MISSING_MYPYC}\n({type(e).__name__}: {e})") from None
    # mypycify type-checks with the project's mypy configuration (pyproject.toml [tool.mypy]) and
    # refuses to compile on a type error, so a compiled build is always a strictly typed one.
    return list(mypycify(COMPILED_MODULES, opt_level=OPT_LEVEL))


# setuptools runs this file as __main__ (python setup.py, pip and the PEP 517 backend alike); the
# guard lets tests and scripts read COMPILED_MODULES with runpy.run_path without running a build.
if __name__ == "__main__":
    if compile_requested():
        setup(ext_modules=compiled_extensions())
    else:
        setup()

"""Which build the suite runs on: plain Python, or with mypyc-compiled modules (setup.py).

A few tests reach inside the call's objects with monkeypatching or a spy subclass;
mypyc's native classes refuse both (read-only methods, no interpreted subclasses).
Those tests skip on the compiled build with this reason; the plain run covers them.
"""

from __future__ import annotations

import importlib.machinery
from types import ModuleType

import pytest


def is_compiled(module: ModuleType) -> bool:
    """``module`` was loaded from a compiled extension (mypyc), not from its ``.py``."""
    path = getattr(module, "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def skip_if_compiled(module: ModuleType, what: str) -> pytest.MarkDecorator:
    """Skip a test that patches or subclasses ``module``'s classes when mypyc compiled it."""
    return pytest.mark.skipif(is_compiled(module),
                              reason=f"{what}: {module.__name__} is mypyc-compiled (native classes "
                                     "cannot be patched or subclassed); the plain-Python run covers it")

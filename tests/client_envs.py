"""Install a client package into its own directory at test time, for a subprocess to use.

Some clients cannot share the test venv (an older major of the official SDK
pins other versions of the same libraries). ``pip_target`` installs the given
requirements with this interpreter's pip into ``.venv/test-clients/<hash>/``
once (later runs reuse it) and returns the directory; run the client with
``client_env`` as its environment. When PyPI cannot be reached the test is
skipped and says so; any other pip failure fails the test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / "test-clients"
#: pip's words for "the index could not be reached".
OFFLINE_SIGNS = (
    "NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
    "No matching distribution found", "Could not fetch URL", "ConnectTimeoutError", "ProxyError",
)
INSTALL_TIMEOUT_S = 300


def pip_target(requirements: list[str]) -> Path:
    """A directory holding ``requirements`` and their dependencies (cached by their hash)."""
    key = hashlib.sha1("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    target = CACHE / key
    if (target / ".complete").exists():
        return target
    staging = CACHE / f"{key}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-input",
           "--target", str(staging), *requirements]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install {' '.join(requirements)} took over {INSTALL_TIMEOUT_S} s (PyPI slow or unreachable)")
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(sign in output for sign in OFFLINE_SIGNS):
            pytest.skip(f"PyPI unreachable, cannot install {' '.join(requirements)}: {output.strip()[-300:]}")
        pytest.fail(f"pip install {' '.join(requirements)} failed:\n{output[-2000:]}")
    (staging / ".complete").write_text("\n".join(requirements) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def client_env(path: Path) -> dict[str, str]:
    """This environment with ``path`` first on ``PYTHONPATH`` (run with ``python -s``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(path)
    env.pop("PYTHONHOME", None)
    return env

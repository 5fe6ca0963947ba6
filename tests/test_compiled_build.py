"""setup.py, the opt-in mypyc build: the module list and the switch, without compiling anything.

Compiling takes a minute or more, so the compiled behaviour is tested elsewhere: .ci/run's third
step runs this whole suite on a build made by deploy/compile-in-place.sh, and the image build checks
that every listed module was imported from its extension. Here: every listed module is a real module
inside the distribution's packages; without MEDIA_BRIDGE_COMPILE=1 setup.py is a plain setup()
that never imports mypyc; with it, the list goes to mypycify, or the build stops with the
instructions when mypyc is missing.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_PY = REPO / "setup.py"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def setup_namespace() -> dict[str, Any]:
    """setup.py's globals, read without running setup() (its build is guarded by __main__)."""
    return runpy.run_path(str(SETUP_PY), run_name="media_bridge_setup")


def run_setup_py(monkeypatch: pytest.MonkeyPatch, compile_env: str | None) -> dict[str, Any]:
    """Run setup.py as setuptools does (__main__), capturing the keyword arguments given to setup()."""
    import setuptools

    captured: dict[str, Any] = {}

    def fake_setup(**kwargs: Any) -> None:
        captured.update(kwargs)
        captured["called"] = True

    monkeypatch.setattr(setuptools, "setup", fake_setup)
    if compile_env is None:
        monkeypatch.delenv("MEDIA_BRIDGE_COMPILE", raising=False)
    else:
        monkeypatch.setenv("MEDIA_BRIDGE_COMPILE", compile_env)
    runpy.run_path(str(SETUP_PY), run_name="__main__")
    assert captured.pop("called", False), "setup.py did not call setup()"
    return captured


def test_compiled_modules_exist_inside_the_packages() -> None:
    modules: list[str] = setup_namespace()["COMPILED_MODULES"]
    assert modules, "COMPILED_MODULES is empty"
    assert len(set(modules)) == len(modules), "a module is listed twice"
    included = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    top_packages = {pattern.rstrip("*") for pattern in included}
    for module in modules:
        path = REPO / module
        assert not Path(module).is_absolute() and module.endswith(".py"), f"{module}: a relative .py path"
        assert path.is_file(), f"{module} does not exist"
        parts = Path(module).parts
        assert parts[0] in top_packages, (
            f"{module} is not in the distribution's packages {sorted(top_packages)}"
        )
        # mypyc names each extension after its dotted module; every directory on the way is a package.
        for depth in range(1, len(parts)):
            init = REPO.joinpath(*parts[:depth], "__init__.py")
            assert init.is_file(), (
                f"{module}: {init.relative_to(REPO)} missing, so it is not a package module"
            )
        assert Path(module).stem != "__init__", f"{module}: compile modules, not package initialisers"


def test_plain_build_never_imports_mypyc(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes any `import mypyc...` raise ImportError.
    for name in ("mypyc", "mypyc.build"):
        monkeypatch.setitem(sys.modules, name, None)
    for value in (None, "", "0", "yes"):  # only "1" compiles
        assert run_setup_py(monkeypatch, value) == {}, f"MEDIA_BRIDGE_COMPILE={value!r}"


def test_compile_without_mypyc_stops_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mypyc", "mypyc.build"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as exc:
        run_setup_py(monkeypatch, "1")
    message = str(exc.value.code)
    assert "pip install mypy setuptools>=77" in message
    assert "--no-build-isolation" in message


def test_compile_hands_the_list_to_mypycify(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("mypyc") is None:
        pytest.skip("mypyc not installed (the dev extra has it)")
    import mypyc.build

    calls: list[tuple[list[str], dict[str, Any]]] = []
    extension = object()

    def fake_mypycify(paths: list[str], **kwargs: Any) -> list[object]:
        calls.append((list(paths), kwargs))
        return [extension]

    monkeypatch.setattr(mypyc.build, "mypycify", fake_mypycify)
    kwargs = run_setup_py(monkeypatch, "1")
    assert kwargs == {"ext_modules": [extension]}
    ((paths, options),) = calls
    assert paths == setup_namespace()["COMPILED_MODULES"]
    assert options.get("opt_level") == "3"


def test_setup_py_version_without_mypyc() -> None:
    """The real setuptools reads pyproject.toml through setup.py; mypyc is blocked from importing."""
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    if major < 77:
        # ./run test's venv keeps pip's default setuptools; deploy/compile-in-place.sh upgrades it.
        pytest.skip(f'setuptools {setuptools.__version__} here; pyproject\'s `license = "MIT"` needs >= 77')
    code = (
        "import runpy, sys; sys.modules['mypyc'] = sys.modules['mypyc.build'] = None; "
        "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEDIA_BRIDGE_COMPILE"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == PYPROJECT["project"]["version"], proc.stdout


def test_setup_py_compiles_exactly_bridge_builds_list() -> None:
    from bridge import build

    assert setup_namespace()["COMPILED_MODULES"] == build.source_paths()
    assert [p.removesuffix(".py").replace("/", ".") for p in build.source_paths()] == list(build.COMPILED_MODULES)


def test_require_compiled_names_the_modules_run_from_source() -> None:
    """The check CI and the image build use: it must fail on a plain build, naming the modules."""
    from bridge import build

    if not build.interpreted_modules():
        pytest.skip("this run is on the compiled build (CI's third step); the plain run checks the failure")
    proc = subprocess.run([sys.executable, "-m", "bridge.build", "--require-compiled"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "compiled: 0 of" in proc.stdout and "bridge.call" in proc.stdout
    plain = subprocess.run([sys.executable, "-m", "bridge.build"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    assert plain.returncode == 0, "without --require-compiled it only reports"


def test_require_compiled_passes_on_the_compiled_build() -> None:
    from bridge import build

    if build.interpreted_modules():
        pytest.skip("plain build: CI's third step runs this on the compiled one")
    assert build.main(["--require-compiled"]) == 0

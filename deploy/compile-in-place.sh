#!/usr/bin/env bash
# The mypyc build from source, in a copy of the tree: deploy/compile-in-place.sh DIR
#
# Copies the repository's files (git ls-files: tracked plus untracked-but-not-ignored; without git,
# the packages, tests, bench, deploy and the top-level files) into DIR, then compiles setup.py's
# COMPILED_MODULES there with mypyc (MEDIA_BRIDGE_COMPILE=1 python setup.py build_ext --inplace).
# Each module's .so lands next to its .py, plus one shared *__mypyc*.so at DIR's top level; run
# anything from DIR with PYTHONPATH=DIR so the compiled modules shadow the editable install:
#   deploy/compile-in-place.sh .build-compiled
#   cd .build-compiled && PYTHONPATH=$PWD ../.venv/bin/python -m pytest -q
# DIR is deleted first (idempotent, no stale .so), but only if it is empty or was made by this script.
# Uses the project's venv (.venv, made by ./run test; PYTHON=... to use another interpreter) and
# upgrades setuptools there to >= 77 (65.x rejects pyproject's `license = "MIT"`); needs a C compiler.
set -euo pipefail

die() { echo "compile-in-place: $*" >&2; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: deploy/compile-in-place.sh DIR"
src=$(cd "$(dirname "$0")/.." && pwd -P)
python=${PYTHON:-$src/.venv/bin/python}
[ -x "$python" ] || die "no interpreter at $python: run ./run test once (it creates .venv), or set PYTHON"
command -v "${CC:-cc}" >/dev/null 2>&1 || die "no C compiler (${CC:-cc}): mypyc needs gcc or clang"

mkdir -p "$1"
target=$(cd "$1" && pwd -P)
case "$src/" in
  "$target"/*) die "refusing to use $target: it contains the source tree" ;;
esac
# Marks DIR as ours, so a re-run may delete it and a typo cannot wipe an unrelated directory.
marker=.media-bridge-compiled-copy
if [ -n "$(ls -A "$target")" ] && [ ! -f "$target/$marker" ]; then
  die "refusing to delete $target: not empty and not made by this script (no $marker)"
fi
rm -rf "$target"
mkdir -p "$target"
echo "copy of $src, compiled with mypyc by deploy/compile-in-place.sh" > "$target/$marker"

# --- the build tools, in the venv itself (compiling uses --no-build-isolation semantics) -----------
if ! "$python" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
  "$python" -m pip install -q --disable-pip-version-check "setuptools>=77"
fi
if ! "$python" -c 'import mypyc.build' 2>/dev/null; then
  "$python" -m pip install -q --disable-pip-version-check "mypy>=1.11"
fi

# --- the copy ----------------------------------------------------------------------------------------
if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and new (not ignored) files; a tracked file deleted in the work tree is skipped.
  git -C "$src" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do
      if [ -f "$src/$path" ]; then printf '%s\0' "$path"; fi
    done |
    tar -C "$src" --null -T - -cf - | tar -C "$target" -xf -
else
  for entry in bridge telephony metrics tests bench deploy pyproject.toml setup.py README.md run \
               .ci .dockerignore .gitignore; do
    if [ -e "$src/$entry" ]; then cp -a "$src/$entry" "$target/"; fi
  done
  find "$target" -name __pycache__ -type d -prune -exec rm -rf {} +
fi

# --- compile -----------------------------------------------------------------------------------------
cd "$target"
started=$SECONDS
MEDIA_BRIDGE_COMPILE=1 "$python" setup.py -q build_ext --inplace > build-compiled.log 2>&1 || {
  tail -n 40 build-compiled.log >&2
  die "mypyc build failed (full log: $target/build-compiled.log)"
}

# Every listed module is imported from its extension here (bridge/build.py names any that is not).
echo "mypyc: built in $((SECONDS - started)) s into $target"
PYTHONPATH="$target" "$python" -m bridge.build --require-compiled ||
  die "a listed module has no extension (full log: $target/build-compiled.log)"

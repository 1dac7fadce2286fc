#!/usr/bin/env bash
# Create or reuse the project's virtual environment. Dependencies are installed only when
# pyproject.toml changed since the last install (its hash is the stamp); a clone at another
# path re-points the editable install without reinstalling anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing dependencies into $VENV (first run: a few minutes)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  # No pip self-upgrade (the venv's pip installs editable projects; the build backend comes from
  # pyproject's build-system), and the byte-compiling pip does file by file done on every core
  # instead (PYTHONDONTWRITEBYTECODE, set on some machines, would otherwise leave every process
  # compiling torch from source): 80 s instead of 2 min on 2 cores.
  "$VENV/bin/python" -m pip install -q --no-compile -e ".[test]"
  "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
  rm -f "$VENV"/.deps-*
  pwd > "$stamp"
elif [ "$(cat "$stamp")" != "$(pwd)" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  pwd > "$stamp"
fi

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
  # pyproject's build-system) and no byte-compiling of every installed file (torch alone has
  # thousands nobody imports; Python compiles what is imported, once): 1 min instead of 2.
  "$VENV/bin/python" -m pip install -q --no-compile -e ".[test]"
  rm -f "$VENV"/.deps-*
  pwd > "$stamp"
elif [ "$(cat "$stamp")" != "$(pwd)" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  pwd > "$stamp"
fi

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
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  rm -f "$VENV"/.deps-*
  pwd > "$stamp"
elif [ "$(cat "$stamp")" != "$(pwd)" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  pwd > "$stamp"
fi

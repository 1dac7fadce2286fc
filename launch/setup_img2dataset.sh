#!/usr/bin/env bash
# Create or reuse a virtual environment holding the real img2dataset CLI, and print its python.
#
# img2dataset requires webdataset<0.3 while this project requires webdataset>=1.0.2, so it
# cannot live in the project's venv: it gets its own, beside it, at
# ${IMG2DATASET_VENV:-${VENV:-.venv}-img2dataset}. pip resolves img2dataset's dependencies from
# the package index (a fresh install takes about 30-60 s). Pillow is added so the venv is also a
# typical webdataset 0.2 reader (`.decode("pil")`); img2dataset itself decodes with OpenCV. The
# stamp is a hash of the requirements: change IMG2DATASET_REQUIREMENTS and the venv is rebuilt.
# When already set up the script prints only the python path. Used by tests/test_img2dataset.py.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=${IMG2DATASET_REQUIREMENTS:-img2dataset==1.47.0 pillow}
DIR=${IMG2DATASET_VENV:-${VENV:-.venv}-img2dataset}
PYTHON=${PYTHON:-python3}
stamp="$DIR/.req-$(printf '%s' "$REQUIREMENTS" | sha256sum | cut -c1-16)"

refuse_unless_replaceable() {
  if [ "$(realpath -m "$DIR")" = "$(realpath -m "${VENV:-.venv}")" ]; then
    echo "setup_img2dataset: $DIR is the project's venv; img2dataset needs one of its own (webdataset<0.3)" >&2; exit 1
  fi
  if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/pyvenv.cfg" ]; then
    echo "setup_img2dataset: $DIR exists and is not a virtual environment; not replacing it" >&2; exit 1
  fi
}

install() {
  refuse_unless_replaceable
  echo "setup_img2dataset: installing $REQUIREMENTS into $DIR (first run: under a minute)" >&2
  rm -rf "$DIR"
  mkdir -p "$DIR"
  "$PYTHON" -m venv "$DIR"
  echo '*' > "$DIR/.gitignore"  # never committed, wherever the venv lands
  local log="$DIR/install.log"
  if ! { "$DIR/bin/python" -m pip install --upgrade pip setuptools wheel \
         && "$DIR/bin/python" -m pip install $REQUIREMENTS; } > "$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "setup_img2dataset: pip could not install $REQUIREMENTS into $DIR (is the package index reachable?); full log: $log" >&2
    exit 1
  fi
  NO_ALBUMENTATIONS_UPDATE=1 "$DIR/bin/python" -c "import img2dataset, webdataset, PIL" \
    || { echo "setup_img2dataset: $REQUIREMENTS installed but does not import" >&2; exit 1; }
  touch "$stamp"
}

mkdir -p "$(dirname "$DIR")"
lock="${TMPDIR:-/tmp}/setup_img2dataset-$(realpath -m "$DIR" | sha256sum | cut -c1-16).lock"
exec 9> "$lock"  # two test sessions at once install it once
flock 9
[ -f "$stamp" ] && [ -x "$DIR/bin/python" ] || install
echo "$(cd "$DIR" && pwd)/bin/python"

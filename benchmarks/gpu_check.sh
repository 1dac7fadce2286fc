#!/usr/bin/env bash
# The GPU check as one command on a machine without network: install the wheels gathered by
# benchmarks/gpu_wheels.sh into a private folder (nothing else on the machine changes), then run
# `python -m benchmarks.gpu`. Arguments go to it (e.g. --output OUT.json --budget 300).
#
#   WHEELS=.whl bash benchmarks/gpu_check.sh [--output runs/gpu_check.json]
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.whl}
site=${SITE:-/tmp/ldp-site}
python=${PYTHON:-python3}
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec "$python" -m benchmarks.gpu "$@"

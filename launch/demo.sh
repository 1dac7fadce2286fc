#!/usr/bin/env bash
# The end-to-end demo on the embedded synthetic dataset, on CPU. Stages that exist so far:
# synth -> shard -> inspect. Every stage writes into runs/demo/ and can be rerun alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_BIN:-python}
OUT=${DEMO_DIR:-runs/demo}
COUNT=${DEMO_COUNT:-2000}
RES=${DEMO_RESOLUTION:-32}

echo "== 1/3 synth: $COUNT compositional images at ${RES}px"
"$PY" -m data_tools.synth --output "$OUT/synth" --count "$COUNT" --resolution "$RES" --seed 0
echo "== 2/3 shard: WebDataset image shards"
"$PY" -m data_tools.shard --input "$OUT/synth" --output "$OUT/shards" --resolution "$RES" \
    --format png --samples-per-shard 500 --workers 2 --seed 0
echo "== 3/3 inspect: validate shards, contact sheet"
"$PY" -m data_tools.inspect "$OUT/shards" --contact-sheet "$OUT/contact_sheet.png" --samples 24

echo
echo "demo output in $OUT/:"
echo "  synth/              images, captions and ground-truth attributes"
echo "  shards/             WebDataset tars, *_stats.json, dataset.json"
echo "  contact_sheet.png   24 samples with their captions"

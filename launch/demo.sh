#!/usr/bin/env bash
# The end-to-end demo on the embedded synthetic dataset, on CPU:
# synth -> shard -> inspect -> autoencoder -> text encoders -> latents -> teacher -> student.
# Every stage writes into runs/demo/ and can be rerun alone; finished stages are skipped
# (each one resumes or recognises its complete output).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_BIN:-python}
OUT=runs/demo
COUNT=${DEMO_COUNT:-3000}
RES=32
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
stage() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

stage "1/8 synth: $COUNT compositional images at ${RES}px"
"$PY" -m data_tools.synth --output "$OUT/synth" --count "$COUNT" --resolution "$RES" --seed 0
stage "2/8 shard: WebDataset image shards"
"$PY" -m data_tools.shard --input "$OUT/synth" --output "$OUT/shards" --resolution "$RES" \
    --format png --samples-per-shard 500 --workers 2 --seed 0
stage "3/8 inspect: validate shards, contact sheet"
"$PY" -m data_tools.inspect "$OUT/shards" --contact-sheet "$OUT/contact_sheet.png" --samples 24
stage "4/8 autoencoder: VAE + patch-GAN"
[ -f "$OUT/autoencoder/vae/config.json" ] || "$PY" -m pipeline.train_autoencoder --config configs/autoencoder_demo.yaml
stage "5/8 text encoders: small seeded T5 + CLIP"
[ -f "$OUT/encoders/encoders.yaml" ] || "$PY" -m data_tools.make_encoders --output "$OUT/encoders"
stage "6/8 encode: latent shards"
"$PY" -m data_tools.encode --input "$OUT/shards" --output "$OUT/latents" --config configs/encode_demo.yaml
stage "7/8 teacher: DiT + rectified flow"
"$PY" -m pipeline.train --config configs/dit_demo.yaml
stage "8/8 student: consistency distillation"
"$PY" -m pipeline.distill --config configs/distill_demo.yaml

stage "done"
cat <<TXT
demo output in $OUT/:
  contact_sheet.png              24 training samples with their captions
  autoencoder/                   VAE (vae/), held-out PSNR (eval.json), reconstructions.png
  latents/                       latent shards + dataset.json
  teacher/samples/final.png      teacher grid, 50 Euler steps, guidance 4
  teacher/loss_by_t.png          training loss by timestep
  student/report/report.md       student (1/2/4/8 steps) vs teacher (50 steps): adherence, s/image, grids
TXT

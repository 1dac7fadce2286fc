#!/usr/bin/env bash
# The end-to-end demo on the embedded synthetic dataset, on CPU:
# synth -> shard -> inspect -> autoencoder -> text encoders -> latents -> teacher -> student
# -> diffusers grids -> evaluate -> edit (inpainting, image-to-image, outpainting, super-resolution) -> report.
# Every stage writes into $OUT and can be rerun alone; finished stages are skipped (each one
# resumes or recognises its complete output).
#
#   bash launch/demo.sh           the demo (runs/demo, 18-21 min on 2 cores)
#   bash launch/demo.sh --quick   the same chain at toy size (runs/demo-quick, under 2 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_BIN:-python}
RES=32
if [ "${1:-}" = "--quick" ]; then
    OUT=${DEMO_OUT:-runs/demo-quick}
    COUNT=400 EVAL_COUNT=8 EDIT_COUNT=2 PER_SHARD=100
    # Non-square scenes through aspect-ratio buckets of about 32² px (24x48, 32x32, 48x24):
    # shards keep each image's size, encode crops to the nearest bucket, batches hold one bucket.
    ASPECT=0.5,1,2 SHARD_SIZE=(--resize none) BUCKETS=(buckets=32)
    AE=(steps=150 eval_every=150 factor_samples=200 data.held_out=64 checkpoint.every=150)
    TEACHER=(steps=60 sampling.every=0 checkpoint.every=60 data.loader.batch_size=32 optim.warmup_steps=10)
    STUDENT=(steps=20 checkpoint.every=20 data.loader.batch_size=32 optim.warmup_steps=5)
else
    OUT=${DEMO_OUT:-runs/demo}
    COUNT=${DEMO_COUNT:-6000} EVAL_COUNT=512 EDIT_COUNT=256 PER_SHARD=500
    ASPECT=1 SHARD_SIZE=(--resolution "$RES") BUCKETS=()
    AE=() TEACHER=() STUDENT=()
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
stage() {
    local t=$(( $(date +%s) - start ))
    printf '%s\t%s\n' "$1" "$t" >> "$OUT/stages.tsv"
    echo; echo "== $1 ($t s)"
}

stage "synth"
# Half the training scenes hold two objects (binding a colour and shape to each position is the hard
# part); the evaluation set keeps synth's default quarter. See configs/dit_demo.yaml for the screens.
"$PY" -m data_tools.synth --output "$OUT/synth" --count "$COUNT" --resolution "$RES" --seed 0 --aspect "$ASPECT" \
    --second-object-prob 0.5
stage "shard"
"$PY" -m data_tools.shard --input "$OUT/synth" --output "$OUT/shards" "${SHARD_SIZE[@]}" \
    --format png --samples-per-shard "$PER_SHARD" --workers 2 --seed 0
stage "inspect"
"$PY" -m data_tools.inspect "$OUT/shards" --contact-sheet "$OUT/contact_sheet.png" --samples 24
stage "autoencoder"
[ -f "$OUT/autoencoder/vae/config.json" ] || "$PY" -m pipeline.train_autoencoder \
    --config configs/autoencoder_demo.yaml output_dir="$OUT" data.shards="$OUT/shards" ${AE[@]+"${AE[@]}"}
stage "text-encoders"
[ -f "$OUT/encoders/encoders.yaml" ] || "$PY" -m data_tools.make_encoders --output "$OUT/encoders"
stage "encode"
"$PY" -m data_tools.encode --input "$OUT/shards" --output "$OUT/latents" --config configs/encode_demo.yaml \
    vae.path="$OUT/autoencoder/vae" text.t5.path="$OUT/encoders/t5" text.clip.path="$OUT/encoders/clip" ${BUCKETS[@]+"${BUCKETS[@]}"}
"$PY" -m data_tools.preview_latents "$OUT/latents" --output "$OUT/latents_decoded.png"
stage "teacher"
"$PY" -m pipeline.train --config configs/dit_demo.yaml output_dir="$OUT" data.latents="$OUT/latents" \
    ${TEACHER[@]+"${TEACHER[@]}"}
stage "distill"
"$PY" -m pipeline.distill --config configs/distill_demo.yaml output_dir="$OUT" data.latents="$OUT/latents" \
    teacher="$OUT/teacher/model" ${STUDENT[@]+"${STUDENT[@]}"}
stage "diffusers"
# The exported folders are diffusers pipelines: each reloaded by stock DiffusionPipeline.from_pretrained
# (custom_pipeline route) in a fresh process, the same grid as pipeline.sample draws from it.
PROMPTS=(--prompt "a large red circle at the center on a white background"
         --prompt "a small blue square at the top left on a black background"
         --prompt "a large yellow triangle at the bottom right on a navy background"
         --prompt "a small green cross at the top right on a beige background")
"$PY" -m pipeline.sample --diffusers --model "$OUT/teacher/model" --steps 50 --guidance 4 "${PROMPTS[@]}" \
    --output "$OUT/diffusers/teacher_50.png"
"$PY" -m pipeline.sample --diffusers --model "$OUT/student/model" --steps 4 --guidance 4 "${PROMPTS[@]}" \
    --output "$OUT/diffusers/student_4.png"
stage "evaluate"
# Unseen prompts: the synthetic generator with another seed gives new attribute combinations,
# with their images as the reference set.
"$PY" -m data_tools.synth --output "$OUT/eval_synth" --count "$EVAL_COUNT" --resolution "$RES" --seed 12345 \
    --second-object-prob 0.25
"$PY" -m data_tools.shard --input "$OUT/eval_synth" --output "$OUT/eval_shards" --resolution "$RES" \
    --format png --samples-per-shard 500 --workers 1 --seed 0
EVAL=(--reference "$OUT/eval_shards" --count "$EVAL_COUNT" --guidance 4 --batch-size 64)  # see configs/distill_demo.yaml
# The teacher at 50 steps is the reference; at 1/2/4 steps it is the baseline the student must beat.
"$PY" -m pipeline.evaluate --model "$OUT/teacher/model" --steps 50 1 2 4 --output "$OUT/eval/teacher_{steps}" "${EVAL[@]}"
"$PY" -m pipeline.evaluate --model "$OUT/student/model" --steps 1 2 4 --output "$OUT/eval/student_{steps}" "${EVAL[@]}"
stage "edit"
# The issue's four edits on 256 cases each (FlowEdit, the fifth, is left to `--tasks` for time).
"$PY" -m pipeline.evaluate_edits --teacher "$OUT/teacher/model" --student "$OUT/student/model" --count "$EDIT_COUNT" \
    --tasks inpaint img2img outpaint superres --baseline "$OUT/eval/teacher_50" --guidance 4 --batch-size 64 \
    --output "$OUT/edits"
stage "report"
"$PY" -m pipeline.demo_report --run "$OUT"
stage "done"

cat <<TXT
demo output in $OUT/:
  report.md, report.json         the summary: PSNR, adherence, seconds per image, goals, grids, curves
  contact_sheet.png              24 training samples with their captions
  autoencoder/                   VAE (vae/), held-out PSNR (eval.json), reconstructions.png
  latents/                       latent shards + dataset.json
  latents_decoded.png            stored latents decoded back (original | decoded pairs)
  teacher/samples/final.png      teacher grid, 50 Euler steps, guidance 4
  teacher/model, student/model   diffusers pipeline folders (LatentDiffusionPipeline.from_pretrained)
  diffusers/                     grids from both, loaded by stock DiffusionPipeline in a fresh process
  eval/                          pipeline.evaluate outputs (per_prompt.jsonl, summary.json, images)
  edits/                         pipeline.evaluate_edits: edit_report.md/json, edit_sheet.png
TXT

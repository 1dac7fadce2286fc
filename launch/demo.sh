#!/usr/bin/env bash
# The end-to-end demo on the embedded synthetic dataset, on CPU:
# synth -> shard -> inspect -> autoencoder -> text encoders -> latents -> teacher, then two lanes:
# [student -> diffusers grids -> evaluate students -> guidance sweeps -> pix2pix / L2 baselines] beside
# [evaluate teacher -> LoRA concept -> image-conditioned model], then edit (inpainting, image-to-image,
# outpainting, super-resolution) -> inverse problems (colourisation, 4x super-resolution: every method
# side by side) -> report.
# Every stage writes into $OUT and can be rerun alone; finished stages are skipped (each one
# resumes or recognises its complete output).
#
#   bash launch/demo.sh           the demo (runs/demo, about 26 min on 2 cores)
#   bash launch/demo.sh --quick   the same chain at toy size (runs/demo-quick, about 4 min)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_BIN:-python}
RES=32
if [ "${1:-}" = "--quick" ]; then
    OUT=${DEMO_OUT:-runs/demo-quick}
    COUNT=400 EVAL_COUNT=8 EDIT_COUNT=2 PER_SHARD=100 CONCEPT_COUNT=200 CONCEPT_EVAL=8 O2M_PROMPTS=4 SWEEP_COUNT=8 INVERSE_COUNT=2
    SWEEP_GUIDANCE=(1 4)  # the two cells the report reads (the curves need no more to be drawn)
    # Non-square scenes through aspect-ratio buckets of about 32² px (24x48, 32x32, 48x24):
    # shards keep each image's size, encode crops to the nearest bucket, batches hold one bucket.
    ASPECT=0.5,1,2 SHARD_SIZE=(--resize none) BUCKETS=(buckets=32)
    # 150 steps at the full run's peak lr: clipping keeps so short a run off the plateau it can land on
    # (held-out PSNR over seeds 0/1/2 in fp32: 10.8/17.0/17.3 unclipped, 16.9/15.6/17.0 clipped).
    AE=(steps=150 eval_every=150 factor_samples=200 data.held_out=64 checkpoint.every=150 optim.grad_clip=1.0)
    TEACHER=(steps=40 sampling.every=0 checkpoint.every=40 data.loader.batch_size=32 optim.warmup_steps=10)
    STUDENT=(steps=20 checkpoint.every=20 data.loader.batch_size=32 optim.warmup_steps=5)
    LORA=(steps=20 checkpoint.every=20 data.loader.batch_size=32 optim.warmup_steps=5)
    COND=(steps=20 checkpoint.every=20 data.loader.batch_size=32 optim.warmup_steps=5 sampling.sources=4 sampling.steps=8)
    P2P=(steps=20 eval_every=20 data.held_out=16 checkpoint.every=20)
else
    OUT=${DEMO_OUT:-runs/demo}
    COUNT=${DEMO_COUNT:-6000} EVAL_COUNT=512 EDIT_COUNT=128 PER_SHARD=500 CONCEPT_COUNT=1500 CONCEPT_EVAL=256 O2M_PROMPTS=32 SWEEP_COUNT=64
    INVERSE_COUNT=128 SWEEP_GUIDANCE=(1 2 4 6)
    ASPECT=1 SHARD_SIZE=(--resolution "$RES") BUCKETS=()
    AE=() TEACHER=() STUDENT=() LORA=() COND=() P2P=()
fi
# The configs train in bf16 (what GPUs run). A CPU without bf16 matrix kernels (AVX2 only: no AVX-512
# or AMX) multiplies bf16 ~14x slower than fp32 (the quick demo took 850 s there in bf16), so on one
# the training stages run in fp32 (pipeline.training.distributed.native_bf16 decides; the test suite's
# bf16 cells still run bf16).
if ! "$PY" -c "import sys; from pipeline.training.distributed import native_bf16; sys.exit(not native_bf16())"; then
    echo "demo: this CPU has no bf16 matrix kernels (AVX2 only): the training stages run in fp32 (mixed_precision=no)"
    AE+=(mixed_precision=no) TEACHER+=(mixed_precision=no) STUDENT+=(mixed_precision=no) LORA+=(mixed_precision=no)
    COND+=(mixed_precision=no) P2P+=(mixed_precision=no)
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
# A fifth of the captions leave one attribute out (colour, position, size or background): what the
# model draws for it is then its own choice, which the one-to-many evaluation compares with the data.
"$PY" -m data_tools.synth --output "$OUT/synth" --count "$COUNT" --resolution "$RES" --seed 0 --aspect "$ASPECT" \
    --second-object-prob 0.5 --underspecify 0.2
# The concept set: the same grammar with half of the objects in "mint", a colour the teacher's data
# never shows (the LoRA stage teaches it). The autoencoder, our stand-in for a pretrained VAE that
# knows every colour, trains on both; the teacher only on the first.
"$PY" -m data_tools.synth --output "$OUT/concept_synth" --count "$CONCEPT_COUNT" --resolution "$RES" --seed 1 \
    --aspect "$ASPECT" --second-object-prob 0.5 --concept mint --concept-prob 0.5
stage "shard"
for SET in "" concept_; do
    "$PY" -m data_tools.shard --input "$OUT/${SET}synth" --output "$OUT/${SET}shards" "${SHARD_SIZE[@]}" \
        --format png --samples-per-shard "$PER_SHARD" --workers 2 --seed 0
done
# Paired data for the image-conditioned models (issue 28): every training scene with a grayscale or a
# 4x-downsampled source at its own size, drawn per sample, so one model learns both tasks.
"$PY" -m data_tools.pairs --input "$OUT/shards" --output "$OUT/cond_shards" --degradation grayscale,down4 \
    --samples-per-shard "$PER_SHARD" --workers 1 --seed 0
stage "inspect"
"$PY" -m data_tools.inspect "$OUT/shards" --contact-sheet "$OUT/contact_sheet.png" --samples 24
stage "autoencoder"
# One shard list (a WebDataset "a.tar::b.tar" list), the concept shards first: the last shard, held
# out for the PSNR, is one of the teacher's.
AE_SHARDS=$(ls "$OUT"/concept_shards/*.tar "$OUT"/shards/*.tar | sed ':a;N;$!ba;s/\n/::/g')
[ -f "$OUT/autoencoder/vae/config.json" ] || "$PY" -m pipeline.train_autoencoder \
    --config configs/autoencoder_demo.yaml output_dir="$OUT" data.shards="$AE_SHARDS" ${AE[@]+"${AE[@]}"}
stage "text-encoders"
[ -f "$OUT/encoders/encoders.yaml" ] || "$PY" -m data_tools.make_encoders --output "$OUT/encoders"
stage "encode"
"$PY" -m data_tools.encode --input "$OUT/shards" --output "$OUT/latents" --config configs/encode_demo.yaml \
    vae.path="$OUT/autoencoder/vae" text.t5.path="$OUT/encoders/t5" text.clip.path="$OUT/encoders/clip" ${BUCKETS[@]+"${BUCKETS[@]}"}
"$PY" -m data_tools.preview_latents "$OUT/latents" --output "$OUT/latents_decoded.png"
# The pairs: each target latent with its source's latent beside it (KEY.src_latent.npy).
"$PY" -m data_tools.encode --input "$OUT/cond_shards" --output "$OUT/cond_latents" --config configs/encode_demo.yaml \
    vae.path="$OUT/autoencoder/vae" text.t5.path="$OUT/encoders/t5" text.clip.path="$OUT/encoders/clip" ${BUCKETS[@]+"${BUCKETS[@]}"}
stage "teacher"
"$PY" -m pipeline.train --config configs/dit_demo.yaml output_dir="$OUT" data.latents="$OUT/latents" \
    ${TEACHER[@]+"${TEACHER[@]}"}
# After the teacher, two lanes share the cores, one thread each (two one-thread jobs here finish
# in 0.65x the time of the same two, one after the other, at two threads): the teacher's lane
# (its evaluation, then the LoRA stage) in the background, logged to $OUT/teacher_lane.log; the
# students' (distillation, the diffusers grids, their evaluation, the guidance sweeps) here.
ALL=$OMP_NUM_THREADS HALF=$(( OMP_NUM_THREADS > 1 ? OMP_NUM_THREADS / 2 : 1 ))
# Unseen prompts: the synthetic generator with another seed gives new attribute combinations,
# with their images as the reference set.
"$PY" -m data_tools.synth --output "$OUT/eval_synth" --count "$EVAL_COUNT" --resolution "$RES" --seed 12345 \
    --second-object-prob 0.25
"$PY" -m data_tools.shard --input "$OUT/eval_synth" --output "$OUT/eval_shards" --resolution "$RES" \
    --format png --samples-per-shard 500 --workers 1 --seed 0
EVAL=(--reference "$OUT/eval_shards" --count "$EVAL_COUNT" --guidance 4 --batch-size 64)  # see configs/distill_demo.yaml
# Diversity: k-NN precision / recall / density / coverage and the Vendi score in 16x16-pixel space
# (no Inception or DINOv2 weights offline; flat colours make pixel distance meaningful here), and
# one-to-many: 16 seeds for each of $O2M_PROMPTS prompts that leave an attribute unnamed.
DIVERSE=(--pixels --one-to-many 16 --one-to-many-prompts "$O2M_PROMPTS")

teacher_lane() {
    stage "evaluate teacher"
    # The teacher at 50 steps is the reference; at 1/2/4 steps it is the baseline the student must beat.
    "$PY" -m pipeline.evaluate --model "$OUT/teacher/model" --steps 50 1 2 4 --output "$OUT/eval/teacher_{steps}" \
        "${EVAL[@]}" "${DIVERSE[@]}"
    stage "lora"
    # LoRA teaches the teacher "mint" (configs/dit_lora_demo.yaml). Concept prompts are the evaluation
    # scenes with every object in mint: the teacher before, teacher + LoRA after; the 512 old prompts
    # show what the adapters cost the rest (the goal: within 0.02 of the teacher).
    "$PY" -m data_tools.encode --input "$OUT/concept_shards" --output "$OUT/concept_latents" --config configs/encode_demo.yaml \
        vae.path="$OUT/autoencoder/vae" text.t5.path="$OUT/encoders/t5" text.clip.path="$OUT/encoders/clip" ${BUCKETS[@]+"${BUCKETS[@]}"}
    "$PY" -m pipeline.train --config configs/dit_lora_demo.yaml output_dir="$OUT" data.latents="$OUT/concept_latents" \
        model.init="$OUT/teacher/model" ${LORA[@]+"${LORA[@]}"}
    "$PY" -m data_tools.synth --output "$OUT/concept_eval_synth" --count "$CONCEPT_EVAL" --resolution "$RES" --seed 12345 \
        --second-object-prob 0.25 --concept mint
    "$PY" -m data_tools.shard --input "$OUT/concept_eval_synth" --output "$OUT/concept_eval_shards" --resolution "$RES" \
        --format png --samples-per-shard 500 --workers 1 --seed 0
    local concept=(--reference "$OUT/concept_eval_shards" --count "$CONCEPT_EVAL" --guidance 4 --batch-size 64 --steps 50)
    "$PY" -m pipeline.evaluate --model "$OUT/teacher/model" "${concept[@]}" --output "$OUT/eval/concept_teacher_50"
    "$PY" -m pipeline.evaluate --model "$OUT/lora_concept/model" "${concept[@]}" --output "$OUT/eval/concept_lora_50"
    "$PY" -m pipeline.evaluate --model "$OUT/lora_concept/model" --steps 50 --output "$OUT/eval/lora_50" "${EVAL[@]}"
    stage "image-conditioned"
    # The teacher widened into an image-to-image model (configs/dit_cond_demo.yaml): the source's latent
    # concatenated on the channels, zero-initialised, fine-tuned on the grayscale / 4x-downsampled pairs.
    "$PY" -m pipeline.train --config configs/dit_cond_demo.yaml output_dir="$OUT" data.latents="$OUT/cond_latents" \
        model.init="$OUT/teacher/model" ${COND[@]+"${COND[@]}"}
}
( export OMP_NUM_THREADS=$HALF; teacher_lane ) > "$OUT/teacher_lane.log" 2>&1 &
LANE=$!
trap '[ -z "${LANE:-}" ] || kill "$LANE" 2>/dev/null || true' EXIT
echo "teacher lane (evaluation, LoRA) in the background: $OUT/teacher_lane.log"
export OMP_NUM_THREADS=$HALF
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
stage "evaluate students"
"$PY" -m pipeline.evaluate --model "$OUT/student/model" --steps 1 2 4 --output "$OUT/eval/student_{steps}" "${EVAL[@]}" "${DIVERSE[@]}"
stage "sweep"
# The fidelity-diversity curves: guidance 1-6 on the first $SWEEP_COUNT prompts, teacher and students in one sweep/.
# With one-to-many at 8 seeds for 16 prompts: adherence against within-prompt diversity.
SWEEP=(--reference "$OUT/eval_shards" --count "$SWEEP_COUNT" --guidance "${SWEEP_GUIDANCE[@]}" --batch-size 64 --pixels --sweep "$OUT/sweep"
       --one-to-many 8 --one-to-many-prompts "$((O2M_PROMPTS / 2))")
"$PY" -m pipeline.evaluate --model "$OUT/teacher/model" --steps 50 --output "$OUT/sweep/teacher_g{guidance}_{steps}" "${SWEEP[@]}"
"$PY" -m pipeline.evaluate --model "$OUT/student/model" --steps 1 2 4 --output "$OUT/sweep/student_g{guidance}_{steps}" "${SWEEP[@]}"
stage "pix2pix"
# The baselines from the same pairs, in pixel space: pix2pix (U-Net + conditional PatchGAN, L_cGAN + 100 L1)
# and its twin trained on L2 alone (the blurry conditional mean).
for P2P_CONFIG in pix2pix_demo pix2pix_l2_demo; do
    "$PY" -m pipeline.train_pix2pix --config "configs/$P2P_CONFIG.yaml" output_dir="$OUT" data.shards="$OUT/cond_shards" \
        ${P2P[@]+"${P2P[@]}"}
done
stage "wait for the teacher lane"
wait "$LANE" || { echo "the teacher lane failed; its log ends:"; tail -30 "$OUT/teacher_lane.log"; exit 1; }
LANE=
export OMP_NUM_THREADS=$ALL
stage "edit"
# The editing issue's four edits on 128 cases each (256 when its goals were set; halved for the demo's
# time: a standard error of about 0.03 on a rate near 0.85). FlowEdit, the fifth, is left to `--tasks`.
"$PY" -m pipeline.evaluate_edits --teacher "$OUT/teacher/model" --student "$OUT/student/model" --count "$EDIT_COUNT" \
    --tasks inpaint img2img outpaint superres --baseline "$OUT/eval/teacher_50" --guidance 4 --batch-size 64 \
    --output "$OUT/edits"
stage "inverse problems"
# Colourisation and 4x super-resolution, every method on the same cases: the source as is (bicubic),
# the L2 and pix2pix baselines, SDEdit and the data-consistent solver (the teacher, no retraining) and
# the image-conditioned model. Guidance 1.5 (the conditioned model's image guidance 1.2, from its
# folder's config) and SDEdit at strength 0.7 / 0.5: each method's best of a small screen (README).
"$PY" -m pipeline.evaluate_edits --teacher "$OUT/teacher/model" --tasks colourise sr4 --count "$INVERSE_COUNT" \
    --conditioned "$OUT/cond/model" --pix2pix "$OUT/pix2pix/generator" --l2 "$OUT/pix2pix_l2/generator" \
    --guidance 1.5 --image-guidance 1.2 --inverse-strength colourise=0.7 sr4=0.5 --solver-steps 25 --batch-size 64 \
    --output "$OUT/inverse"
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
  eval/                          pipeline.evaluate outputs (per_prompt.jsonl, one_to_many.jsonl, summary.json, images)
  teacher_lane.log               the teacher lane's output (evaluation, LoRA), run beside the students'
  sweep/                         guidance x steps: sweep.md, sweep.png (adherence against coverage / recall)
  lora_concept/                  the LoRA run: lora/pytorch_lora_weights.safetensors, model/ (fused)
  edits/                         pipeline.evaluate_edits: edit_report.md/json, edit_sheet.png
  cond_shards/, cond_latents/    grayscale / 4x-downsampled pairs (data_tools.pairs) and their latents
  cond/, pix2pix/, pix2pix_l2/   the image-conditioned DiT (model/) and the pixel-space baselines (generator/)
  inverse/                       colourisation and 4x SR, every method: edit_report.md, sheet_colourise.png, sheet_sr4.png
TXT

#!/usr/bin/env bash
# Rehearse the GPU check on this machine (issue 30, item 5): a fresh venv holding only packages
# the GPU machines' image already has (device tool, KINDS.md: torch, accelerate, transformers and
# the rest below; none of diffusers, DeepSpeed, webdataset, open_clip), the wheels that
# benchmarks/gpu_wheels.sh gathers installed from their folder alone (--no-index, as there), then
# `benchmarks.gpu --cpu`. Exits with the check's status; about 5 minutes on 2 cores (the venv
# takes torch from pip's cache or the local file).
#
#   bash benchmarks/gpu_rehearse.sh [WORK_DIR=/tmp/gpu-rehearse]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/gpu-rehearse}
python=${PYTHON:-python3}
image=(torch==2.14.1 accelerate transformers numpy pillow pyyaml safetensors sentencepiece protobuf timm tqdm psutil
       regex peft einops huggingface_hub tokenizers fsspec filelock py-cpuinfo packaging msgpack nvidia-ml-py requests
       scipy matplotlib zipp)
mkdir -p "$work"
[ -x "$work/venv/bin/python" ] || "$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "${image[@]}"
PYTHON="$work/venv/bin/python" TARGET_PYTHON="$("$work/venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
    bash benchmarks/gpu_wheels.sh "$work/whl"
rm -rf "$work/site"
PYTHON="$work/venv/bin/python" WHEELS="$work/whl" SITE="$work/site" \
    bash benchmarks/gpu_check.sh --cpu --output "$work/gpu_check.json"

#!/usr/bin/env bash
# Gather the wheels `python -m benchmarks.gpu` needs on a GPU machine without network whose Python
# already has torch, accelerate, transformers, numpy, pillow, pyyaml, safetensors, sentencepiece,
# timm and tqdm (as NVIDIA/PyTorch images do): diffusers, DeepSpeed, webdataset, open_clip and
# what they need beyond that. Run it on a machine with network, from the repository root, then
# carry the folder and run `bash benchmarks/gpu_check.sh` there.
#
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh [OUT_DIR=.whl]
#
# PYTHON must have torch (DeepSpeed ships only a source archive; its wheel is built here, without
# compiled ops: they are built on first use). TARGET_PYTHON is the GPU machine's Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
python=${PYTHON:-python3}
target=${TARGET_PYTHON:-3.12}
mkdir -p "$out"
binary=(--only-binary=:all: --python-version "$target" --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$python" -m pip download -q --no-deps "${binary[@]}" -d "$out" \
    diffusers==0.42.1 importlib-metadata webdataset==1.0.2 braceexpand open-clip-torch==3.3.0 ftfy wcwidth hjson
"$python" -m pip download -q "${binary[@]}" -d "$out" pydantic  # with its pinned pydantic-core
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
ls "$out"

#!/usr/bin/env bash
# The plain torchrun alternative to `accelerate launch` (no accelerate config file): the training
# config alone decides DeepSpeed and its ZeRO stage, as always.
#
#   bash launch/torchrun.sh --config configs/dit_b2_256.yaml optim.lr=2e-4                  # 1 node × 8 GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/torchrun.sh --config configs/dit_xl2_256.yaml   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash launch/torchrun.sh --config configs/dit_xl2_256.yaml   # on node1
#   MODULE=data_tools.encode bash launch/torchrun.sh --input data/shards --output data/latents --config configs/encode.yaml
#
# Every argument is passed to the module unchanged. Knobs (defaults): NNODES [1], NPROC_PER_NODE
# [8], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], MODULE [pipeline.train],
# PYTHON [python]. On a machine without GPUs NPROC_PER_NODE=2 makes a 2-process gloo job.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MODULE="${MODULE:-pipeline.train}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-30}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m "$MODULE" "$@"

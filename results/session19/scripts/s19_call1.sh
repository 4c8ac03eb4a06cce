#!/bin/bash
# Session 19, call 1: ViT-B b256 bounds (GELU / LayerNorm as identity) beside the real step
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
date -u > $OUT/date.txt
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $OUT/date.txt
timeout 330 python benchmarks/speed_levers.py --steps 10 --json $OUT/bounds.json \
  --profile vit-base:256:blocks vit-base:256:blocks+nogelu+nonorm \
  --variants vit-base:256:blocks vit-base:256:blocks+nogelu vit-base:256:blocks+nonorm \
    vit-base:256:blocks+nogelu+nonorm vit-base:256:whole vit-base:256:whole+nogelu+nonorm \
    vit-base:256:blocks > $OUT/bounds.txt 2>&1
echo "rc=$?" >> $OUT/bounds.txt

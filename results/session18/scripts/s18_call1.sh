#!/bin/bash
# Session 18, call 1: ViT-B b256 levers (bf16 residual stream, all-bf16 upper bound, whole compile, cdt, TMA templates)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
date -u > $OUT/date.txt
timeout 420 python benchmarks/speed_levers.py --steps 10 --json $OUT/levers.json \
  --profile vit-base:256:blocks vit-base:256:blocks+bf16res \
  --variants vit-base:256:blocks vit-base:256:blocks+bf16res vit-base:256:blocks+allbf16 \
    vit-base:256:whole+bf16res vit-base:256:blocks vit-base:256:blocks+bf16res vit-base:256:whole \
    vit-base:256:blocks+bf16res+cdt > $OUT/levers.txt 2>&1
echo "rc=$?" >> $OUT/levers.txt
timeout 150 python benchmarks/speed_levers.py --steps 10 --profile \
  --variants vit-base:256:blocks_ma+tma+bf16res > $OUT/tma.txt 2>&1
echo "rc=$?" >> $OUT/tma.txt

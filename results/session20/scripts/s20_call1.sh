#!/bin/bash
# Session 20, call 1: the fused clip step on the GPU, A/B against HEAD (ABBA, one process per case)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" >> $OUT/gpu.txt
CASES=("vit-base:16=auto" "vit-base:128:fp16:torch_ddp_fp16=auto" "vit-base:128=auto")
run() {  # side rep
  local root=$PWD; [ "$1" = head ] && root=$PWD/.dev/head
  echo "== $1 $2 $(date -u +%T)" >> $OUT/ab.txt
  timeout 200 python $root/benchmarks/step_speed.py --steps 100 --warmup 8 --timeout 90 --json $OUT/ab_$1.jsonl \
    --cases "${CASES[@]}" >> $OUT/ab.txt 2>&1
}
run head 1; run new 1; run new 2; run head 2
date -u >> $OUT/date.txt

#!/usr/bin/env bash
# Every strategy for a few steps on 2 GPUs with NCCL (vit-micro, 32 px): catches what
# gloo on CPU cannot (fused AdamW on DTensors, fp16 scalers, pinned offload, NCCL groups).
# Usage: bash benchmarks/gpu_smoke.sh [out_dir]
set -u
out=${1:-results/gpu_smoke}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
run() {  # name, args...
  local name=$1; shift
  python3 -m torch.distributed.run --nproc_per_node 2 --master_port $((29500 + RANDOM % 1000)) -m vitboost train \
    --model vit-micro --dataset data/beans --epochs 1 --max_steps 12 -b 32 --lr 1e-3 --no-progress \
    --output /tmp/smoke_$name --overwrite --cache_dir /tmp/vbcache "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(grep -h 'eval accuracy' "$out/$name.log" | tr '\n' ' ')"
}
run ddp --plugin torch_ddp
run ddp_fp16 --plugin torch_ddp_fp16
run zero1 --plugin low_level_zero --zero_stage 1
run zero2 --plugin low_level_zero --zero_stage 2
run zero2_fp16 --plugin low_level_zero --zero_stage 2 --mixed_precision fp16
run fsdp --plugin fsdp
run gemini --plugin gemini
run tp2 --plugin hybrid_parallel --tp_size 2
run pp2 --plugin hybrid_parallel --pp_size 2
run pp2_fp16_refused --plugin hybrid_parallel --pp_size 2 --mixed_precision fp16  # expected: one-line error
run compile_ddp --plugin torch_ddp --compile

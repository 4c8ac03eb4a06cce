#!/bin/bash
# Session 19, call 2: the CUDA graph at ViT-B b256 (A/B, alternating, one process), then issue 10's whole table
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
timeout 140 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 135 --json $OUT/graph256.jsonl \
  --cases "vit-base:256=blocks,blocks+graph,blocks,blocks+graph" > $OUT/graph256.txt 2>&1
echo "rc=$?" >> $OUT/graph256.txt
timeout 420 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 90 --json $OUT/table.jsonl --cases \
  "vit-base:16=auto,peer:hf_eager,peer:timm_cudagraph" "vit-base:32=auto,peer:timm_cudagraph" \
  "vit-small:128=auto,peer:timm_compile" "vit-base:256=auto,peer:timm_compile" "vit-base:128:fp32=auto" \
  "vit-small:128:bf16:hybrid_parallel=auto" "vit-small:128:bf16:fsdp=auto" \
  "vit-base:128:fp16:torch_ddp_fp16=auto" "vit-base:128:bf16:low_level_zero=auto" \
  "vit-base:128:bf16:gemini=auto" "vit-base:128:fp16:gemini=auto" > $OUT/table.txt 2>&1
echo "rc=$?" >> $OUT/table.txt
date -u >> $OUT/date.txt

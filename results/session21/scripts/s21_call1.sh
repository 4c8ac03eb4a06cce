#!/bin/bash
# Session 21, call 1: issue 10's whole table on e31ab49 (peers in the same processes), then the issue's timm anchor script
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" >> $OUT/gpu.txt
python -c "import torch, transformers, timm; print(torch.__version__, transformers.__version__, timm.__version__)" >> $OUT/gpu.txt 2>&1
timeout 430 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 90 --json $OUT/table.jsonl --cases \
  "vit-base:16=auto,peer:hf_eager,peer:timm_cudagraph" "vit-base:32=auto,peer:timm_cudagraph" \
  "vit-small:128=auto,peer:timm_compile" "vit-base:256=auto,peer:timm_compile" "vit-base:128:fp32=auto" \
  "vit-small:128:bf16:hybrid_parallel=auto" "vit-small:128:bf16:fsdp=auto" \
  "vit-base:128:fp16:torch_ddp_fp16=auto" "vit-base:128:bf16:low_level_zero=auto" \
  "vit-base:128:bf16:gemini=auto" "vit-base:128:fp16:gemini=auto" > $OUT/table.txt 2>&1
echo "rc=$?" >> $OUT/table.txt
date -u >> $OUT/date.txt
timeout 130 python .dev/small_batch.py > $OUT/anchor.txt 2>&1
echo "rc=$?" >> $OUT/anchor.txt
date -u >> $OUT/date.txt

#!/bin/bash
# Session 22, call 2: the GPU tests of the new block and of session 21's stops; then issue 10's table (without gemini and
# fp32, measured in sessions 19-21) on the code with the CLS-only last block, the peers in the same processes
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" >> $OUT/gpu.txt
bash scripts/gpu_tests.sh 120 tests/test_fast_paths.py tests/test_train.py -k \
  "fast_paths or fp16_logs_its_loss_scale or diverged_run_stops or every_rank_stops" > $OUT/gpu_tests.txt 2>&1
echo "rc=$?" >> $OUT/gpu_tests.txt
date -u >> $OUT/date.txt
timeout 390 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 70 --json $OUT/table.jsonl --cases \
  "vit-base:16=auto,peer:timm_cudagraph" "vit-base:32=auto,peer:timm_cudagraph" \
  "vit-small:128=auto,peer:timm_compile" "vit-base:256=auto,peer:timm_compile" \
  "vit-small:128:bf16:hybrid_parallel=auto" "vit-small:128:bf16:fsdp=auto" \
  "vit-base:128:fp16:torch_ddp_fp16=auto" "vit-base:128:bf16:low_level_zero=auto" > $OUT/table.txt 2>&1
echo "rc=$?" >> $OUT/table.txt
date -u >> $OUT/date.txt
tail -4 $OUT/gpu_tests.txt; grep -E "^\| |rc=|!!" $OUT/table.txt

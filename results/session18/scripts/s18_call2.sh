#!/bin/bash
# Session 18, call 2: the bf16 residual stream (now the default) against autocast's fp32 stream, the table's
# rows with peers, and the fast-vs-eager loss check
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date2.txt
timeout 150 python benchmarks/speed_levers.py --steps 10 --profile --json $OUT/ab256.json \
  --variants vit-base:256:blocks+fp32res vit-base:256:blocks vit-base:256:blocks+fp32res vit-base:256:blocks > $OUT/ab256.txt 2>&1
echo "rc=$?" >> $OUT/ab256.txt
VITBOOST_BF16_RESIDUAL=0 timeout 100 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 45 --json $OUT/table_fp32res.jsonl \
  --cases "vit-base:16=auto" "vit-base:32=auto" "vit-small:128=auto" > $OUT/table_fp32res.txt 2>&1
echo "rc=$?" >> $OUT/table_fp32res.txt
timeout 170 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 60 --json $OUT/table.jsonl \
  --cases "vit-base:16=auto,peer:timm_cudagraph" "vit-base:32=auto" "vit-small:128=auto" "vit-base:256=auto,peer:timm_compile" > $OUT/table.txt 2>&1
echo "rc=$?" >> $OUT/table.txt
timeout 120 python benchmarks/step_parity.py --json $OUT/parity.json > $OUT/parity.txt 2>&1
echo "rc=$?" >> $OUT/parity.txt
date -u >> $OUT/date2.txt

#!/bin/bash
# Session 21, call 6: fp16's residual stream in fp16 (this change) against autocast's fp32 stream (VITBOOST_RESIDUAL_FP32=1),
# torch_ddp_fp16 ViT-B b128, alternating processes A B B A; bf16 beside; the fp16 fast-vs-eager check
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
ab() { VITBOOST_RESIDUAL_FP32=$1 timeout 75 python benchmarks/step_speed.py --steps 100 --warmup 8 --timeout 70 --json $OUT/ab.jsonl --cases "$2" >> $OUT/ab.txt 2>&1; echo "rc=$? VITBOOST_RESIDUAL_FP32=$1 $2" >> $OUT/ab.txt; }
F=vit-base:128:fp16:torch_ddp_fp16=auto
ab 1 $F; ab 0 $F; ab 0 $F; ab 1 $F; ab 0 vit-base:128=auto
date -u >> $OUT/date.txt
timeout 60 python benchmarks/step_parity.py --plugins torch_ddp_fp16 --init_scale 1024 --json $OUT/parity_fp16.json > $OUT/parity_fp16.txt 2>&1
echo "rc=$?" >> $OUT/parity_fp16.txt
date -u >> $OUT/date.txt
grep -E "^vitboost|^rc=" $OUT/ab.txt; grep -E "^\| torch|rc=" $OUT/parity_fp16.txt

#!/bin/bash
# Session 22, call 1: the last block computed for the CLS token only (the new default) against HF's full block
# (VITBOOST_CLS_ONLY=0 / +clsfull): ViT-B b256 in speed_levers' processes, then the train defaults at b16/b32/vit-small
# b128 in alternating processes; then the fast-vs-eager loss check on every one-GPU plugin with the new block
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv > $OUT/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" >> $OUT/gpu.txt
python -c "import torch, transformers, timm; print(torch.__version__, transformers.__version__, timm.__version__)" >> $OUT/gpu.txt 2>&1
timeout 260 python benchmarks/speed_levers.py --steps 10 --profile vit-base:256:blocks --variants \
  vit-base:256:blocks+clsfull vit-base:256:blocks vit-base:256:blocks+clscompiled vit-base:256:blocks+clsfull \
  vit-base:256:blocks vit-base:256:whole+clsfull vit-base:256:whole > $OUT/levers.txt 2>&1
echo "rc=$?" >> $OUT/levers.txt
date -u >> $OUT/date.txt
ab() { VITBOOST_CLS_ONLY=$1 timeout 80 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 25 --json $OUT/ab.jsonl \
  --cases "vit-base:16=auto" "vit-base:32=auto" "vit-small:128=auto" >> $OUT/ab.txt 2>&1; echo "rc=$? VITBOOST_CLS_ONLY=$1" >> $OUT/ab.txt; }
ab 0; ab 1; ab 1; ab 0
date -u >> $OUT/date.txt
timeout 110 python benchmarks/step_parity.py --json $OUT/parity.json > $OUT/parity.txt 2>&1
echo "rc=$?" >> $OUT/parity.txt
date -u >> $OUT/date.txt
grep -E "^vit|rc=" $OUT/levers.txt | tail -12; grep -E "^\| vit|^rc=" $OUT/ab.txt; grep -E "^\| |rc=" $OUT/parity.txt

#!/bin/bash
# Session 19, call 3: the timm anchor script on this machine, and the fast-vs-eager loss check
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
timeout 240 python .dev/small_batch.py > $OUT/anchor.txt 2>&1
echo "rc=$?" >> $OUT/anchor.txt
timeout 150 python benchmarks/step_parity.py --json $OUT/parity.json > $OUT/parity.txt 2>&1
echo "rc=$?" >> $OUT/parity.txt
date -u >> $OUT/date.txt

#!/bin/bash
# Session 22, call 3: the stop tests with the loss spoiled through a device tensor (a graphed step sees it), then
# test_train.py and test_faults.py on the GPU as far as the time allows
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date.txt
bash scripts/gpu_tests.sh 100 tests/test_train.py -k \
  "fp16_logs_its_loss_scale or diverged_run_stops or every_rank_stops" > $OUT/stops.txt 2>&1
echo "rc=$?" >> $OUT/stops.txt
date -u >> $OUT/date.txt
bash scripts/gpu_tests.sh 250 tests/test_faults.py tests/test_train.py > $OUT/gpu_tests.txt 2>&1
echo "rc=$?" >> $OUT/gpu_tests.txt
date -u >> $OUT/date.txt
grep -E "PASSED|FAILED|rc=" $OUT/stops.txt; tail -15 $OUT/gpu_tests.txt

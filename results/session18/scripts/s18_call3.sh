#!/bin/bash
# Session 18, call 3: the CUDA tests, the recipe's three seeds on this code
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
date -u > $OUT/date3.txt
pip install -q --no-deps --no-index --target /tmp/xd .dev/wheels/*.whl > /dev/null 2>&1
PYTHONPATH=$PWD:/tmp/xd WORKERS=6 bash scripts/gpu_tests.sh 150 tests/test_step_plan.py tests/test_train.py tests/test_distill.py \
  tests/test_augment.py tests/test_clip.py tests/test_fast_paths.py -k "cuda or gpu or graph or residual" > $OUT/gpu_tests.txt 2>&1
tail -3 $OUT/gpu_tests.txt
for s in 42 43 44; do
  SEED=$s OUTPUT=/tmp/recipe_$s timeout 110 bash scripts/run_demo.sh --no-progress > $OUT/recipe_$s.log 2>&1
  cp /tmp/recipe_$s/summary.json $OUT/summary_$s.json 2>/dev/null
  tail -2 $OUT/recipe_$s.log
done
date -u >> $OUT/date3.txt

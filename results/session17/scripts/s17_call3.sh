#!/usr/bin/env bash
# session 17 call 3: the save_min_seconds test with blocking writes on the GPU; the recipe's first process on this
# machine with this code; gemini ViT-B b128 bf16 / fp16 on one more host
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call3.txt
{ date; uptime; } > $R 2>&1
bash scripts/gpu_tests.sh 60 tests/test_train.py -k "save_min_seconds" > $OUT/gpu_test_fix.txt 2>&1
tail -2 $OUT/gpu_test_fix.txt >> $R
SEED=42 OUTPUT=/tmp/demo_first timeout 120 bash scripts/run_demo.sh --no-progress --cache_dir /tmp/rc1 > $OUT/recipe_first.log 2>&1
tail -2 $OUT/recipe_first.log >> $R
cp /tmp/demo_first/summary.json $OUT/summary_recipe_first.json 2>/dev/null
python - /tmp/demo_first/summary.json >> $R 2>&1 <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"to_accuracy": d["seconds_to_accuracy"], "timings_s": d["timings_s"],
                  "acc": {k: round(v["accuracy"], 4) for k, v in d["eval"].items()}}))
PY
for p in bf16 fp16 bf16 fp16; do
  echo "gemini $p" >> $R
  timeout 90 python benchmarks/gemini_step.py $p 2>&1 | grep -E "^vitboost|Error" | tail -2 >> $R
done
date >> $R

#!/usr/bin/env bash
# session 16 call 5 (a fresh machine, the image as it is): the committed code activates its cache there
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call5.txt
T=$(python -c "import importlib.util; print(importlib.util.find_spec('torch').submodule_search_locations[0])")
echo "torch pyc beside the sources: $(find $T -name '*.pyc' | wc -l)" >> $R
for n in first second; do
  bash results/session12/ab_runner.sh $PWD $n >> $OUT/ab.jsonl 2>&1
  echo "$n $(python -c "import json;d=json.load(open('/tmp/e2e/$n/summary.json'));print(d['launch_marks_s'], d['timings_s']['launch'], d['seconds_to_accuracy'])") pyc in cache: $(find ~/.cache/vitboost/bytecode -name '*.pyc' | wc -l), launch notes: $(grep -c '^launch:' /tmp/e2e/$n.log)" >> $R
done
VITBOOST_BYTECODE=off bash results/session12/ab_runner.sh $PWD off >> $OUT/ab.jsonl 2>&1
echo "off $(python -c "import json;d=json.load(open('/tmp/e2e/off/summary.json'));print(d['timings_s']['launch'])") $(grep '^launch:' /tmp/e2e/off.log | cut -c1-150)" >> $R

#!/usr/bin/env bash
# session 16 call 2 (a fresh machine, the image as it is): the recipe's first and second process with the final
# manifest; vitboost's bytecode cache against an installed-like cache on this host; gemini bf16/fp16
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call2.txt
{ date; uptime; nproc; lscpu | grep -E "Model name|NUMA node\(s\)|Thread"; python benchmarks/page_cache.py fresh; } >> $R 2>&1
summ() { python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"to_accuracy": d["seconds_to_accuracy"], "timings_s": d["timings_s"], "launch_marks_s": d["launch_marks_s"],
                  "acc": {k: round(v["accuracy"], 4) for k, v in d["eval"].items()}}))
PY
}
SEED=42 OUTPUT=/tmp/demo_first bash scripts/run_demo.sh --no-progress --cache_dir /tmp/rc1 > $OUT/recipe_first2.log 2>&1
summ /tmp/demo_first/summary.json >> $R 2>&1; cp /tmp/demo_first/summary.json $OUT/summary_recipe_first2.json
SEED=42 OUTPUT=/tmp/demo_second bash scripts/run_demo.sh --no-progress --cache_dir /tmp/rc1 > $OUT/recipe_second2.log 2>&1
summ /tmp/demo_second/summary.json >> $R 2>&1; cp /tmp/demo_second/summary.json $OUT/summary_recipe_second2.json
# vitboost's cache (the image's PYTHONDONTWRITEBYTECODE) vs session 15's installed-like arm, one warm-up each
for i in 0 1 2 3; do
  bash results/session12/ab_runner.sh $PWD vbcache_$i >> $OUT/cache_ab.jsonl 2>&1
  env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=/tmp/pyc bash results/session12/ab_runner.sh $PWD installed_$i >> $OUT/cache_ab.jsonl 2>&1
done
for round in 1 2 3; do
  for p in bf16 fp16; do
    echo "== $p round $round" >> $R
    timeout 90 python benchmarks/gemini_step.py $p 2>&1 | grep -E "^vitboost|Error" | tail -2 >> $R
  done
done
date >> $R

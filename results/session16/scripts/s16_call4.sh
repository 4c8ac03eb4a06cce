#!/usr/bin/env bash
# session 16 call 4 (a fresh machine, the image as it is), the cache set up before the parser loads torch:
# the recipe's first and second process; the ViT-B 3-epoch launch: vitboost's cache vs an installed-like one,
# and a first launch with and without the compile-ahead workers
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call4.txt
{ date; uptime; python benchmarks/page_cache.py fresh; } >> $R 2>&1
summ() { python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"to_accuracy": d["seconds_to_accuracy"], "timings_s": d["timings_s"], "launch_marks_s": d["launch_marks_s"],
                  "acc": {k: round(v["accuracy"], 4) for k, v in d["eval"].items()}}))
PY
}
SEED=42 OUTPUT=/tmp/demo_first bash scripts/run_demo.sh --no-progress --cache_dir /tmp/rc1 > $OUT/recipe_first.log 2>&1
summ /tmp/demo_first/summary.json >> $R 2>&1; cp /tmp/demo_first/summary.json $OUT/summary_recipe_first.json
SEED=42 OUTPUT=/tmp/demo_second bash scripts/run_demo.sh --no-progress --cache_dir /tmp/rc1 > $OUT/recipe_second.log 2>&1
summ /tmp/demo_second/summary.json >> $R 2>&1; cp /tmp/demo_second/summary.json $OUT/summary_recipe_second.json
rm -rf /tmp/code_n; mkdir -p /tmp/code_n; cp -r vitboost /tmp/code_n/ && rm /tmp/code_n/vitboost/launch_modules.txt
AB=results/session12/ab_runner.sh
arm() {
  case $1 in
    vb_*) bash $AB $PWD $1 ;;
    installed_*) env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=/tmp/pyc bash $AB $PWD $1 ;;
    workers_*) VITBOOST_BYTECODE=/tmp/bcw_$1 bash $AB $PWD $1 ;;
    noworkers_*) VITBOOST_BYTECODE=/tmp/bcn_$1 bash $AB /tmp/code_n $1 ;;
  esac >> $OUT/ab.jsonl 2>&1
  echo "$1 $(python -c "import json;d=json.load(open('/tmp/e2e/$1/summary.json'));print(d['launch_marks_s'], d['timings_s']['launch'], d['seconds_to_accuracy'])")" >> $R; }
arm vb_0; arm installed_0
for i in 1 2 3; do arm vb_$i; arm installed_$i; arm workers_$i; arm noworkers_$i; done
date >> $R

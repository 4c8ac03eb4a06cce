#!/usr/bin/env bash
# session 16 call 1 (a fresh machine, the image as it is: PYTHONDONTWRITEBYTECODE=1, no PYTHONPYCACHEPREFIX)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call1.txt
{ date; uptime; nproc; env | grep -E "^PYTHON|^XDG|^HOME"; ls -la ~/.cache 2>&1 | head; python benchmarks/page_cache.py fresh; } >> $R 2>&1
summ() { python - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"to_accuracy": d["seconds_to_accuracy"], "timings_s": d["timings_s"], "launch_marks_s": d["launch_marks_s"],
                  "acc": {k: round(v["accuracy"], 4) for k, v in d["eval"].items()}}))
PY
}
# 1. the recipe's first process on this machine, compile-ahead workers with the CPU-recorded manifest
SEED=42 OUTPUT=/tmp/demo_first bash scripts/run_demo.sh --no-progress --cache_dir /tmp/rc1 > $OUT/recipe_first.log 2>&1
summ /tmp/demo_first/summary.json >> $R 2>&1
cp /tmp/demo_first/summary.json $OUT/summary_recipe_first.json
{ echo "pyc in the cache: $(find ~/.cache/vitboost/bytecode -name '*.pyc' | wc -l)"; grep -c "^launch:" $OUT/recipe_first.log; date; } >> $R 2>&1
# 2. record what GPU runs import (the recipe, compiled and graphed; the ViT-B fine-tune), then the CPU list after it
cp vitboost/launch_modules.txt /tmp/cpu_manifest.txt && rm vitboost/launch_modules.txt
python scripts/record_launch_modules.py train --config configs/beans_scratch.yaml --dataset data/beans --epochs 12 \
  --teacher_epochs 2 --compile true --cuda_graph true --output /tmp/rec1 --cache_dir /tmp/rc1 --no-progress > $OUT/record1.log 2>&1
python scripts/record_launch_modules.py train --dataset data/beans --model vit-base --pretrained none -b 32 --epochs 3 \
  --output /tmp/rec2 --cache_dir /tmp/rc1 --no-progress > $OUT/record2.log 2>&1
cp vitboost/launch_modules.txt $OUT/launch_modules_gpu.txt
cat /tmp/cpu_manifest.txt >> vitboost/launch_modules.txt
python -c "
from pathlib import Path; p = Path('vitboost/launch_modules.txt'); n = list(dict.fromkeys(p.read_text().split()))
p.write_text('\n'.join(n) + '\n'); print('merged manifest', len(n))" >> $R 2>&1
tail -1 $OUT/record1.log $OUT/record2.log >> $R 2>&1
# 3. A/B on the ViT-B 3-epoch run, an empty bytecode folder per run: workers (merged manifest) vs none vs cached
rm -rf /tmp/code_w /tmp/code_n; mkdir -p /tmp/code_w /tmp/code_n
cp -r vitboost /tmp/code_w/ && cp -r vitboost /tmp/code_n/ && rm /tmp/code_n/vitboost/launch_modules.txt
for i in 1 2 3; do
  VITBOOST_BYTECODE=/tmp/bc_w$i bash results/session12/ab_runner.sh /tmp/code_w workers_$i >> $OUT/bytecode_ab.jsonl 2>&1
  VITBOOST_BYTECODE=/tmp/bc_n$i bash results/session12/ab_runner.sh /tmp/code_n noworkers_$i >> $OUT/bytecode_ab.jsonl 2>&1
  VITBOOST_BYTECODE=/tmp/bc_w$i bash results/session12/ab_runner.sh /tmp/code_w cached_$i >> $OUT/bytecode_ab.jsonl 2>&1
done
for n in workers_1 noworkers_1 cached_1; do echo "$n $(python -c "import json;print(json.load(open('/tmp/e2e/$n/summary.json'))['launch_marks_s'])")"; done >> $R 2>&1
date >> $R

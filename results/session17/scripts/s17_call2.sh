#!/usr/bin/env bash
# session 17 call 2: a torchrun rank's launch now counts from its launcher (ViT-B 3 epochs, nproc 1, torchrun and
# vitboost launch, twice each after a warm-up); then the whole suite on the GPU machine (torch 2.11,
# transformers 5.17), 6 pytest-xdist workers sharing the GPU (xdist carried as wheels)
set -u
START=$(date +%s)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call2.txt
REPO=$PWD
{ date; uptime; python -c "import torch, transformers, pytest; print(torch.__version__, transformers.__version__, pytest.__version__)"; } > $R 2>&1
run() {  # run NAME LAUNCHER...
  local name=$1; shift
  mkdir -p /tmp/e2e/wd
  local t0=$(date +%s.%N)
  (cd /tmp/e2e/wd && "$@" train --dataset $REPO/data/beans --model vit-base --pretrained none -b 32 --epochs 3 \
    --cache_dir /tmp/e2e/cache --no-progress --output /tmp/e2e/$name --overwrite > /tmp/e2e/$name.log 2>&1)
  local rc=$? t1=$(date +%s.%N)
  python - /tmp/e2e/$name $t0 $t1 $rc >> $OUT/launch_counted.jsonl <<'PY'
import json, sys
from pathlib import Path
run, wall, rc = Path(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]), sys.argv[4]
s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
print(json.dumps({"run": run.name, "rc": int(rc), "wall_s": round(wall, 2), "seconds_to_accuracy": s.get("seconds_to_accuracy"),
                  "total_seconds": s.get("total_seconds"), "launch": s.get("timings_s", {}).get("launch"),
                  "launch_marks_s": s.get("launch_marks_s")}))
PY
  tail -1 $OUT/launch_counted.jsonl >> $R
  [ $rc = 0 ] || tail -20 /tmp/e2e/$name.log >> $R
}
run warm_0 python -m vitboost
for i in 1 2; do
  run torchrun_$i python -m torch.distributed.run --standalone --nproc_per_node 1 -m vitboost
  run launch_$i python -m vitboost launch --standalone --nproc_per_node 1
done
pip install -q --no-deps --no-index --target /tmp/xd .dev/wheels/*.whl > $OUT/pip.txt 2>&1
date >> $R
PYTHONPATH=$PWD:/tmp/xd WORKERS=6 bash scripts/gpu_tests.sh $(( 585 - $(date +%s) + START )) tests > $OUT/gpu_suite.txt 2>&1
tail -45 $OUT/gpu_suite.txt >> $R; date >> $R

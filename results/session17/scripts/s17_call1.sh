#!/usr/bin/env bash
# session 17 call 1 (a fresh machine): what torchrun's own process costs in an image without bytecode
# (ViT-B 3 epochs, nproc 1: direct / torchrun / vitboost launch, with a warm cache and with a fresh one), then
# the CUDA tests of session 16's changes
set -u
START=$(date +%s)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
R=$OUT/call1.txt
REPO=$PWD
{ date; uptime; nvidia-smi -L; python -c "import sys; print(sys.flags.dont_write_bytecode)"; } >> $R 2>&1
run() {  # run NAME LAUNCHER...
  local name=$1; shift
  mkdir -p /tmp/e2e/wd
  local t0=$(date +%s.%N)
  (cd /tmp/e2e/wd && "$@" train --dataset $REPO/data/beans --model vit-base --pretrained none -b 32 --epochs 3 \
    --cache_dir /tmp/e2e/cache --no-progress --output /tmp/e2e/$name --overwrite > /tmp/e2e/$name.log 2>&1)
  local rc=$? t1=$(date +%s.%N)
  python - /tmp/e2e/$name $t0 $t1 $rc >> $OUT/launcher_ab.jsonl <<'PY'
import json, sys
from pathlib import Path
run, wall, rc = Path(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]), sys.argv[4]
s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
print(json.dumps({"run": run.name, "rc": int(rc), "wall_s": round(wall, 2),
                  "accuracy": {k: round(v["accuracy"], 4) for k, v in s.get("eval", {}).items()},
                  "seconds_to_accuracy": s.get("seconds_to_accuracy"), "launch": s.get("timings_s", {}).get("launch")}))
PY
  tail -1 $OUT/launcher_ab.jsonl >> $R
  [ $rc = 0 ] || tail -20 /tmp/e2e/$name.log >> $R
}
BC=$HOME/.cache/vitboost/bytecode
run warm_0 python -m vitboost
run warm_1 python -m vitboost
TR="python -m torch.distributed.run --standalone --nproc_per_node 1 -m vitboost"
VL="python -m vitboost launch --standalone --nproc_per_node 1"
for i in 1 2 3; do
  run direct_$i python -m vitboost
  run torchrun_$i $TR
  run launch_$i $VL
  run torchrun_first_$i env VITBOOST_BYTECODE=/tmp/bct_$i $TR
  run launch_first_$i env VITBOOST_BYTECODE=/tmp/bcl_$i $VL
done
for i in 1 2 3; do
  for arm in plain cached; do
    t0=$(date +%s.%N)
    if [ $arm = plain ]; then python -c "import torch.distributed.run"; else PYTHONPYCACHEPREFIX=$BC python -c "import torch.distributed.run"; fi
    echo "import torch.distributed.run $arm $(python -c "print(round($(date +%s.%N) - $t0, 2))")" >> $R
  done
done
date >> $R
bash scripts/gpu_tests.sh $(( 575 - $(date +%s) + START )) tests/test_bench.py tests/test_train.py tests/test_cli_errors.py -k "cuda or gpu or bench" > $OUT/gpu_tests.txt 2>&1
tail -5 $OUT/gpu_tests.txt >> $R; date >> $R

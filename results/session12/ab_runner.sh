#!/usr/bin/env bash
# results/session12/ab_runner.sh CODE_ROOT NAME [train flags...] : ViT-B 3 epochs from a neutral cwd with CODE_ROOT's
# vitboost (and any extra flags); one JSON line
REPO=$(cd "$(dirname "$0")/../.." && pwd); code=$1 name=$2; shift 2
mkdir -p /tmp/e2e/wd && cd /tmp/e2e/wd
t0=$(date +%s.%N)
PYTHONPATH=$code python -m vitboost train --dataset $REPO/data/beans --model vit-base --pretrained none -b 32 --epochs 3 \
  --cache_dir /tmp/e2e/cache --no-progress --output /tmp/e2e/$name --overwrite "$@" > /tmp/e2e/$name.log 2>&1
rc=$?; t1=$(date +%s.%N)
python - /tmp/e2e/$name $t0 $t1 $rc <<'PY'
import json, sys
from pathlib import Path
run, wall, rc = Path(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]), sys.argv[4]
s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
acc = {k: v["accuracy"] for k, v in s.get("eval", {}).items()}
print(json.dumps({"run": run.name, "rc": int(rc), "wall_s": round(wall, 2), "accuracy": acc,
                  "seconds_to_accuracy": s.get("seconds_to_accuracy"), "timings_s": s.get("timings_s"),
                  "train_breakdown_s": s.get("train_breakdown_s")}))
PY
[ $rc = 0 ] || tail -20 /tmp/e2e/$name.log

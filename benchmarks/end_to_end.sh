#!/usr/bin/env bash
# Launch-to-printed-accuracy wall time of a beans run, with the per-phase breakdown that
# vitboost writes to summary.json (startup, data, model, train, final eval, export).
#   bash benchmarks/end_to_end.sh OUT_DIR NAME [vitboost train flags...]
# The first run of a fresh cache dir pays for decoding; run twice to see both.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$1 name=$2; shift 2
mkdir -p "$out"
export HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
t0=$(date +%s.%N)
"$py" -m vitboost train --dataset data/beans --output "$out/$name" --overwrite --no-progress "$@" > "$out/$name.log" 2>&1
rc=$?
t1=$(date +%s.%N)
"$py" - "$out/$name" "$t0" "$t1" "$rc" <<'PY'
import json, sys
from pathlib import Path
run, wall, rc = Path(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2]), sys.argv[4]
s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
acc = {k: v["accuracy"] for k, v in s.get("eval", {}).items()}
print(json.dumps({"run": run.name, "rc": int(rc), "wall_s": round(wall, 1), "accuracy": acc,
                  "seconds_to_accuracy": s.get("seconds_to_accuracy"), "timings_s": s.get("timings_s"),
                  "train_breakdown_s": s.get("train_breakdown_s"), "steps": s.get("steps")}))
PY

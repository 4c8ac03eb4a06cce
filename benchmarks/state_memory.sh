#!/usr/bin/env bash
# Training-state bytes per rank (params + grads + optimizer states this rank keeps between
# steps) for every data-parallel strategy, ViT-B/16, counted from the tensors themselves.
# Device-independent, so it runs on CPU (gloo): bash benchmarks/state_memory.sh [out.csv]
set -euo pipefail
cd "$(dirname "$0")/.."
csv=${1:-results/state_memory.csv}; rm -f "$csv"; mkdir -p "$(dirname "$csv")"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
for n in 2 4; do
  for plugin in "torch_ddp" "low_level_zero --zero_stage 1" "low_level_zero --zero_stage 2" "fsdp" "gemini"; do
    python -m torch.distributed.run --standalone --nproc_per_node $n -m vitboost bench --device cpu \
      --model vit-base --num_labels 3 -b 1 --steps 1 --warmup 1 --mixed_precision fp32 --plugin $plugin \
      --csv "$csv" > /dev/null
  done
done
python - "$csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
ddp = {r["world_size"]: float(r["state_gib_per_rank"]) for r in rows if r["plugin"] == "torch_ddp"}
print(f"{'strategy':28} {'ranks':>5} {'state GiB/rank':>15} {'vs DDP':>7}")
for r in rows:
    s = float(r["state_gib_per_rank"])
    print(f"{r['strategy']:28} {r['world_size']:>5} {s:15.3f} {s / ddp[r['world_size']]:7.3f}")
PY

#!/usr/bin/env bash
# The from-scratch beans recipe under every strategy, same seed and global batch (128), then a
# markdown table (validation/test accuracy, final train loss, wall time, img/s, peak GiB).
#   bash benchmarks/strategy_accuracy.sh [out_dir] [name ...]     # default: every run that fits the GPUs
# Names: ddp1_s42 ddp1_s43 ddp1_s44 (1 GPU, 3 seeds), ddp2, ddp2_fp16, zero1, zero2, gemini, tp2, pp2, tp2pp2, pp2dp2
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/strategies}; shift || true
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
declare -A RUNS=(  # name = "processes | flags"   (batch is per data-parallel rank: 128 global everywhere)
  [ddp1_s42]="1|--plugin torch_ddp -b 128 --seed 42"
  [ddp1_s43]="1|--plugin torch_ddp -b 128 --seed 43"
  [ddp1_s44]="1|--plugin torch_ddp -b 128 --seed 44"
  [ddp2]="2|--plugin torch_ddp -b 64"
  [ddp2_fp16]="2|--plugin torch_ddp_fp16 -b 64"
  [zero1]="2|--plugin low_level_zero --zero_stage 1 -b 64"
  [zero2]="2|--plugin low_level_zero --zero_stage 2 -b 64"
  [gemini]="2|--plugin gemini -b 64"
  [tp2]="2|--plugin hybrid_parallel --tp_size 2 -b 128"
  [pp2]="2|--plugin hybrid_parallel --pp_size 2 -b 128 --microbatch_size 64"
  [tp2pp2]="4|--plugin hybrid_parallel --tp_size 2 --pp_size 2 -b 128 --microbatch_size 64"
  [pp2dp2]="4|--plugin hybrid_parallel --pp_size 2 -b 64 --microbatch_size 32"
)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(ddp1_s42 ddp1_s43 ddp1_s44 ddp2 ddp2_fp16 zero1 zero2 gemini tp2 pp2 tp2pp2 pp2dp2)
for name in "${names[@]}"; do
  IFS='|' read -r nproc flags <<< "${RUNS[$name]}"
  if [ "$gpus" -lt "$nproc" ]; then echo "skip $name: needs $nproc GPUs, $gpus visible"; continue; fi
  seed_flag=""; [[ "$flags" == *--seed* ]] || seed_flag="--seed 42"
  python3 -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m vitboost train \
    --config configs/beans_scratch.yaml --dataset data/beans --output "$out/$name" --overwrite \
    --no-progress $seed_flag $flags > "$out.$name.log" 2>&1
  echo "$name rc=$? $(grep -h 'eval accuracy' "$out.$name.log" | tr '\n' ' ')"
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
print("| run | GPUs | validation | test | final train loss | wall s | img/s | peak GiB/GPU |")
print("|---|---|---|---|---|---|---|---|")
for run in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(run.read_text())
    rows = [json.loads(l) for l in (run.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    ips = sum(r["img_per_s"] for r in steps[1:]) / max(1, len(steps) - 1)
    print(f"| {run.parent.name} | {s['strategy']['world_size']} | {s['eval']['validation']['accuracy']:.4f} | "
          f"{s['eval']['test']['accuracy']:.4f} | {steps[-1]['loss']:.4f} | {s['total_seconds']:.0f} | {ips:.0f} | "
          f"{s.get('peak_gib_per_gpu', '-')} |")
PY

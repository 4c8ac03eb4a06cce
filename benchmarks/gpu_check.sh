#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md that need one GPU, in one go, each step under its own time limit
# (a hang loses one step, not the rest). Writes into OUT (default results/gpu_check):
#   recipe.tgz   3 seeds of configs/beans_scratch.yaml through scripts/run_demo.sh, alone on the GPU
#   e2e.log      ViT-B 3-epoch fine-tune, launch to printed accuracy, cold then warm data cache
#   parity.json  fast step (compiled / CUDA graph) vs eager losses, every plugin that runs on one GPU
#   speed.jsonl  gemini bf16/fp16 and torch_ddp_fp16 rows
#   lora.log     ViT-L / ViT-H, LoRA r16 vs full fine-tuning
#   kornia.json  our GPU augmentation vs kornia's (kornia wheels in .whl/, see README.md of the device tool)
#   bash benchmarks/gpu_check.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu_check}; mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
step() { echo "== $(date +%T) $*"; }

step "recipe: 3 seeds, one at a time"
rec=/tmp/vitboost_recipe; rm -rf "$rec"
for seed in 42 43 44; do
  mkdir -p "$rec/seed_$seed"
  SEED=$seed OUTPUT="$rec/run_$seed" timeout 150 bash scripts/run_demo.sh --no-progress > "$rec/seed_$seed/run_demo.log" 2>&1
  cp "$rec/run_$seed/summary.json" "$rec/seed_$seed/" 2>/dev/null
  grep -h "eval accuracy\|launch to printed" "$rec/seed_$seed/run_demo.log"
done
tar czf "$out/recipe.tgz" -C "$rec" seed_42 seed_43 seed_44

step "ViT-B 3 epochs, cold then warm cache"
for name in vitb3_cold vitb3_warm; do
  timeout 40 bash benchmarks/end_to_end.sh /tmp/vitboost_e2e "$name" --model vit-base --pretrained none -b 32 \
    --epochs 3 --cache_dir /tmp/vitboost_e2e/cache
done | tee "$out/e2e.log"

step "parity"
timeout 110 python3 benchmarks/step_parity.py --json "$out/parity.json" | tail -10

step "gemini and fp16 rows"
timeout 70 python3 benchmarks/step_speed.py --steps 20 --warmup 5 --timeout 40 --json "$out/speed.jsonl" --cases \
  "vit-base:128:bf16:gemini=eager" "vit-base:128:fp16:gemini=eager" "vit-base:128:fp16:torch_ddp_fp16=compile+graph" \
  | tail -5

step "LoRA"
MODELS="vit-large vit-huge" STEPS=10 WARMUP=3 EXTRA="--compile false --cuda_graph false" \
  timeout 70 bash benchmarks/lora.sh /tmp/vitboost_lora > "$out/lora.log" 2>&1; tail -8 "$out/lora.log"

step "kornia"
if ls .whl/kornia-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/kornia*.whl && export PYTHONPATH=/tmp/site
fi
timeout 50 python3 benchmarks/augment_kornia.py speed --windows 3 --iters 5 --json "$out/kornia.json" | tail -12
step "done"

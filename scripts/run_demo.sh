#!/usr/bin/env bash
# vitboost's run_demo.sh: ColossalAI's ViT example, rebuilt. Fine-tune a ViT on beans with
# pipeline parallel on 2 GPUs and print the accuracy.
#
#   bash scripts/run_demo.sh 2>&1 | tee output.log                 # offline: from-scratch recipe
#   MODEL=google/vit-base-patch16-224 bash scripts/run_demo.sh     # with network: the reference run
#   PP=1 TP=2 bash scripts/run_demo.sh --epochs 5                   # any value: env vars or flags
#
# Without GPUs it runs a small CPU version (2 processes, gloo) that finishes in minutes.
set -euo pipefail
started=$(date +%s.%N)
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

layout_given=${PP:+yes}${TP:+yes}${NPROC:+yes}   # an explicit layout is refused if it does not fit
PLUGIN=${PLUGIN:-hybrid_parallel}
TP=${TP:-1}
PP=${PP:-2}
MODEL=${MODEL:-}                       # empty: random init with configs/beans_scratch.yaml
CONFIG=${CONFIG:-configs/beans_scratch.yaml}
DATASET=${DATASET:-data/beans}
OUTPUT=${OUTPUT:-runs/demo}
BS=${BS:-16}                           # per data-parallel rank, as in the reference
LR=${LR:-2e-4}
EPOCHS=${EPOCHS:-3}
WD=${WD:-0.05}
WARMUP=${WARMUP:-0.3}
SEED=${SEED:-42}

# the GPUs to use, counted without importing torch (~2 s of the launch): nvidia-smi, narrowed by
# CUDA_VISIBLE_DEVICES when it is set; torch only where nvidia-smi is missing or sees none
count_gpus() {
  local n v
  if n=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c .); then
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
      v=${CUDA_VISIBLE_DEVICES//[[:space:]]/}
      if [ -z "$v" ] || [[ "$v" == -* ]]; then n=0
      else v=$(tr ',' '\n' <<< "$v" | grep -c .); n=$(( v < n ? v : n )); fi
    fi
    echo "$n"
  else
    python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0
  fi
}
gpus=$(count_gpus)
nproc=${NPROC:-$(( TP * PP ))}
if [ "$gpus" -eq 0 ]; then
  echo "run_demo: no GPU found: running the small CPU demo (vit-tiny at 64 px, patch 16, pp=2 on 2 CPU processes)"
  set -x
  exec python3 -m vitboost launch --nproc_per_node 2 train \
    --plugin hybrid_parallel --pp_size 2 --model vit-tiny --image_size 64 --patch_size 16 --dataset "$DATASET" \
    --augment light --epochs "${EPOCHS_CPU:-8}" -b 32 --lr 1e-3 --weight_decay "$WD" --warmup_ratio 0.1 \
    --output "${OUTPUT}_cpu" --overwrite --seed "$SEED" --device cpu "$@"
fi
if [ "$gpus" -eq 1 ] && [ -z "$layout_given" ]; then
  echo "run_demo: one GPU found: running the default layout's recipe on it without pipeline parallel (PP=1)"
  PP=1; nproc=1
fi
if [ "$gpus" -lt "$nproc" ]; then
  echo "run_demo: this layout needs $nproc GPUs (tp=$TP x pp=$PP x dp), but only $gpus are visible; set PP/TP/NPROC to fit, e.g. PP=1 NPROC=$gpus" >&2
  exit 1
fi

if [ -n "$MODEL" ]; then  # the reference recipe, pretrained weights
  recipe=(--model "$MODEL" --batch_size "$BS" --lr "$LR" --epochs "$EPOCHS" --weight_decay "$WD" --warmup_ratio "$WARMUP")
else                      # offline: random init, the best from-scratch recipe we measured
  recipe=(--config "$CONFIG")
fi
# torchrun, run from vitboost: its own process keeps bytecode where an image forbids writing it (vitboost/launch.py)
launch=(python3 -m vitboost launch --nproc_per_node "$nproc")
[ "$nproc" -eq 1 ] && launch=(python3 -m vitboost)   # one process: no torchrun agent to start
set -x
"${launch[@]}" train "${recipe[@]}" \
  --plugin "$PLUGIN" --tp_size "$TP" --pp_size "$PP" --dataset "$DATASET" --output "$OUTPUT" --overwrite \
  --seed "$SEED" "$@"
{ set +x; } 2>/dev/null
took=$(python3 -c "print(round($(date +%s.%N) - $started, 1))")
to_acc=$(python3 -c "import json; print(json.load(open('$OUTPUT/summary.json'))['seconds_to_accuracy'])" 2>/dev/null || echo "?")
echo "run_demo: done in ${took} s; accuracy printed ${to_acc} s after the training command started ($nproc GPU, tp=$TP pp=$PP)"

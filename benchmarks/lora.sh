#!/usr/bin/env bash
# LoRA (peft) against full fine-tuning, one GPU, synthetic data, the trainer's own step:
# trainable parameters, peak GiB and img/s, printed as a markdown table for BENCHMARKS.md.
#   bash benchmarks/lora.sh [OUT_DIR]            # ViT-L/16 and ViT-H/14, batch 64, rank 16: ~2 min on one H200
#   MODELS=vit-huge B=128 RANK=8 bash benchmarks/lora.sh results/lora_h
# Env: MODELS (named configs), B (batch), RANK, STEPS, WARMUP, NUM_LABELS (head width), EXTRA (more bench flags).
# MFU is left out: `vitboost bench` counts full fine-tuning FLOPs (3x forward), which LoRA does not spend.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/lora}
mkdir -p "$out"
csv="$out/lora.csv"
rm -f "$csv"
export HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
for model in ${MODELS:-vit-large vit-huge}; do
  for lora in "" "--lora_rank ${RANK:-16}"; do
    echo "== $model ${lora:-full fine-tuning}"
    # shellcheck disable=SC2086
    "$py" -m vitboost bench --model "$model" -b "${B:-64}" --num_labels "${NUM_LABELS:-1000}" \
      --mixed_precision bf16 --steps "${STEPS:-20}" --warmup "${WARMUP:-5}" $lora ${EXTRA:-} \
      --csv "$csv" 2>&1 | tee -a "$out/lora.log" | tail -3
  done
done
"$py" - "$csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
full = {r["model"]: r for r in rows if "+lora" not in r["strategy"]}
print(f"\n{rows[0]['device']}, bf16, batch {rows[0]['batch_size']}, synthetic data, {rows[0]['steps']} timed steps\n")
print("| model | fine-tuning | params | trainable | trainable % | peak GiB | img/s | step ms | img/s vs full | peak vs full |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    f = full.get(r["model"], r)
    lora = r["strategy"].split("+lora ")[-1] if "+lora" in r["strategy"] else "full"
    params, train = int(r["params"]), int(r["trainable_params"])
    ratio = lambda k: f"{float(r[k]) / float(f[k]):.2f}x" if f[k] and float(f[k]) else "-"  # noqa: E731
    print(f"| {r['model']} | {'LoRA ' + lora if lora != 'full' else 'full'} | {params / 1e6:,.1f}M | "
          f"{train / 1e6:,.2f}M | {100 * train / params:.2f}% | {r['peak_gib_per_gpu'] or '-'} | "
          f"{float(r['img_per_s']):,.0f} | {r['step_time_ms']} | {ratio('img_per_s')} | {ratio('peak_gib_per_gpu')} |")
PY

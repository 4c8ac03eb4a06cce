#!/usr/bin/env bash
# The standard vitboost benchmark matrix on the GPUs this machine has.
#
#   scripts/run_benchmark.sh                 # everything that fits the GPU count
#   OUT_DIR=/tmp/b STEPS=50 scripts/run_benchmark.sh
#
# 1 GPU : vit-base, batch 256, bf16, --compile, with the HF-eager and timm peers
# 2 GPUs: torch_ddp, torch_ddp_fp16, low_level_zero 1/2, fsdp, gemini, pp2 (microbatch 32), tp2
# 4 GPUs: tp2 x pp2, dp4
# (2- and 4-GPU runs: vit-base, batch 128 per data-parallel rank)
# No GPU: a tiny vit-micro run on 2 CPU processes (gloo), so the script can be tried anywhere.
#
# Each run appends a row to $OUT_DIR/bench.csv and writes $OUT_DIR/bench/<run>.json.
# A failed run is reported and the matrix goes on; the exit code says whether any failed.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-results}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
mkdir -p "$OUT_DIR/bench"

# keep NCCL, symmetric memory and NVSHMEM off NVLink multicast (NVLS)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
GPUS=${GPUS:-0}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
FAILED=()

# bench NAME NPROC ARGS...: one torchrun launch of `vitboost bench`
bench() {
    local name=$1 nproc=$2
    shift 2
    echo "=== $name ($nproc proc) ==="
    if ! "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m vitboost bench \
        --steps "$STEPS" --warmup "$WARMUP" --csv "$OUT_DIR/bench.csv" \
        --json "$OUT_DIR/bench/${STAMP}_${name}.json" "$@"; then
        echo "FAILED: $name"
        FAILED+=("$name")
    fi
}

if [ "$GPUS" -eq 0 ]; then
    echo "no GPU found: tiny CPU run (vit-micro, 2 gloo processes)"
    bench cpu_ddp 2 --model vit-micro --plugin torch_ddp -b 16 --device cpu
    bench cpu_fsdp 2 --model vit-micro --plugin fsdp -b 16 --device cpu
    bench cpu_peers 1 --model vit-micro -b 16 --device cpu --peers
else
    echo "found $GPUS GPU(s)"
    bench 1gpu_compile_peers 1 --model vit-base -b 256 --mixed_precision bf16 --compile --peers
    if [ "$GPUS" -ge 2 ]; then
        base=(--model vit-base -b 128)
        bench 2gpu_torch_ddp 2 "${base[@]}" --plugin torch_ddp
        bench 2gpu_torch_ddp_fp16 2 "${base[@]}" --plugin torch_ddp_fp16
        bench 2gpu_zero1 2 "${base[@]}" --plugin low_level_zero --zero_stage 1
        bench 2gpu_zero2 2 "${base[@]}" --plugin low_level_zero --zero_stage 2
        bench 2gpu_fsdp 2 "${base[@]}" --plugin fsdp
        bench 2gpu_gemini 2 "${base[@]}" --plugin gemini
        bench 2gpu_pp2 2 "${base[@]}" --plugin hybrid_parallel --pp_size 2 --microbatch_size 32
        bench 2gpu_tp2 2 "${base[@]}" --plugin hybrid_parallel --tp_size 2
    fi
    if [ "$GPUS" -ge 4 ]; then
        bench 4gpu_tp2_pp2 4 "${base[@]}" --plugin hybrid_parallel --tp_size 2 --pp_size 2 --microbatch_size 32
        bench 4gpu_dp4 4 "${base[@]}" --plugin torch_ddp
    fi
fi

echo "results: $OUT_DIR/bench.csv, $OUT_DIR/bench/${STAMP}_*.json"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed runs: ${FAILED[*]}"
    exit 1
fi

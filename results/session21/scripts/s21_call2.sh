#!/bin/bash
# Session 21, call 2: ColossalAI 0.5.0 beside vitboost on one host (gemini fp16/bf16, torch_ddp_fp16, ZeRO-1, ViT-B b128),
# then the fast-vs-eager loss check under every one-GPU plugin (fp16 also at a scale that does not overflow)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" >> $OUT/gpu.txt
mkdir -p /tmp/cai /tmp/cw && tar xzf .dev/cai/colossalai-0.5.0.tar.gz -C /tmp/cai \
  && python -c "import zipfile; zipfile.ZipFile('.dev/cai/galore_torch-1.0-py3-none-any.whl').extractall('/tmp/cw')"
CAI=$PWD/.dev/cai/shim:/tmp/cw:/tmp/cai/colossalai-0.5.0
peer() { PYTHONPATH=$CAI timeout $1 python benchmarks/colossalai_peer.py --batch_size 128 --json $OUT/peers.jsonl "${@:2}" >> $OUT/peers.txt 2>&1; echo "rc=$? $*" >> $OUT/peers.txt; }
ours() { PYTHONPATH=$PWD timeout $1 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout $(( $1 / 2 )) --json $OUT/ours.jsonl --cases "${@:2}" >> $OUT/ours.txt 2>&1; echo "rc=$?" >> $OUT/ours.txt; }
peer 200 --plugin gemini
ours 100 "vit-base:128:fp16:gemini=auto" "vit-base:128:bf16:gemini=auto"
peer 50 --plugin gemini --precision bf16
peer 45 --plugin torch_ddp_fp16
peer 45 --plugin low_level_zero
ours 60 "vit-base:128:fp16:torch_ddp_fp16=auto" "vit-base:128:bf16:low_level_zero=auto"
date -u >> $OUT/date.txt
export PYTHONPATH=$PWD
timeout 110 python benchmarks/step_parity.py --json $OUT/parity.json > $OUT/parity.txt 2>&1
echo "rc=$?" >> $OUT/parity.txt
timeout 40 python benchmarks/step_parity.py --plugins torch_ddp_fp16 --init_scale 1024 --json $OUT/parity_fp16.json > $OUT/parity_fp16.txt 2>&1
echo "rc=$?" >> $OUT/parity_fp16.txt
date -u >> $OUT/date.txt

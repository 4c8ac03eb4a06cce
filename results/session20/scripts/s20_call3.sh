#!/bin/bash
# Session 20, call 3: ColossalAI 0.5.0 beside vitboost (fused clip step) on one host: torch_ddp_fp16, ZeRO-1, ViT-B b128
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" >> $OUT/gpu.txt
mkdir -p /tmp/cai /tmp/cw && tar xzf .dev/cai/colossalai-0.5.0.tar.gz -C /tmp/cai \
  && python -c "import zipfile; zipfile.ZipFile('.dev/cai/galore_torch-1.0-py3-none-any.whl').extractall('/tmp/cw')"
CAI=$PWD/.dev/cai/shim:/tmp/cw:/tmp/cai/colossalai-0.5.0
peer() { PYTHONPATH=$CAI timeout $1 python benchmarks/colossalai_peer.py --batch_size 128 --json $OUT/peers.jsonl "${@:2}" >> $OUT/peers.txt 2>&1; echo "rc=$? $*" >> $OUT/peers.txt; }
ours() { PYTHONPATH=$PWD timeout $1 python benchmarks/step_speed.py --steps 100 --warmup 8 --timeout $(( $1 / 2 )) --json $OUT/ours.jsonl --cases "${@:2}" >> $OUT/ours.txt 2>&1; echo "rc=$?" >> $OUT/ours.txt; }
peer 200 --plugin torch_ddp_fp16
ours 110 "vit-base:128:fp16:torch_ddp_fp16=auto" "vit-base:128:bf16:low_level_zero=auto"
peer 60 --plugin torch_ddp_fp16
peer 60 --plugin low_level_zero
ours 60 "vit-base:128:fp16:torch_ddp_fp16=auto"
date -u >> $OUT/date.txt

#!/bin/bash
# Session 19, call 4: ColossalAI 0.5.0 (PyPI sdist, carried) beside vitboost on one host: gemini, torch_ddp_fp16,
# low_level_zero at ViT-B b128
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
date -u > $OUT/date.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
mkdir -p /tmp/cai /tmp/cw && tar xzf .dev/cai/colossalai-0.5.0.tar.gz -C /tmp/cai \
  && python -c "import zipfile; zipfile.ZipFile('.dev/cai/galore_torch-1.0-py3-none-any.whl').extractall('/tmp/cw')"
(which g++ nvcc; nvcc --version | tail -2) > $OUT/tools.txt 2>&1
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

#!/bin/bash
# Session 19, call 5 (same machine as call 4, warm): a second round of the gemini fp16 and torch_ddp_fp16 pairs
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1
CAI=$PWD/.dev/cai/shim:/tmp/cw:/tmp/cai/colossalai-0.5.0   # unpacked by call 4
for p in gemini torch_ddp_fp16; do
  PYTHONPATH=$CAI timeout 60 python benchmarks/colossalai_peer.py --plugin $p --batch_size 128 --json $OUT/peers2.jsonl
done
PYTHONPATH=$PWD timeout 80 python benchmarks/step_speed.py --steps 30 --warmup 6 --timeout 40 --json $OUT/ours2.jsonl \
  --cases "vit-base:128:fp16:gemini=auto" "vit-base:128:fp16:torch_ddp_fp16=auto" > $OUT/ours2.txt 2>&1

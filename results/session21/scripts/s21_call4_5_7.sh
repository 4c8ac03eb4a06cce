#!/bin/bash
# Session 21, calls 4, 5 and 7, run inline (the commands as sent).
# call 4 (machine A): ColossalAI 0.5.0 again, since call 2's peers.* did not come back (the device returns at most 8 files)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 HF_HUB_OFFLINE=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
mkdir -p /tmp/cai /tmp/cw && tar xzf .dev/cai/colossalai-0.5.0.tar.gz -C /tmp/cai \
  && python -c "import zipfile; zipfile.ZipFile('.dev/cai/galore_torch-1.0-py3-none-any.whl').extractall('/tmp/cw')"
CAI=$PWD/.dev/cai/shim:/tmp/cw:/tmp/cai/colossalai-0.5.0
for a in "--plugin gemini" "--plugin gemini --precision bf16" "--plugin torch_ddp_fp16" "--plugin low_level_zero" "--plugin gemini"; do
  PYTHONPATH=$CAI timeout 150 python benchmarks/colossalai_peer.py --batch_size 128 --json $OUT/peers.jsonl $a >> $OUT/peers.txt 2>&1
  echo "rc=$? $a" >> $OUT/peers.txt
done
# call 5 (machine A): the anchor script, whole (call 1 cut it at 130 s)
timeout 250 python .dev/small_batch.py > $OUT/anchor.txt 2>&1   # .dev/small_batch.py = ../shared/anchors/small_batch.py
# call 7 (machine B, right after call 6): ColossalAI torch_ddp_fp16 beside call 6's rows
PYTHONPATH=$CAI timeout 110 python benchmarks/colossalai_peer.py --batch_size 128 --plugin torch_ddp_fp16 --json $OUT/peers.jsonl > $OUT/peers.txt 2>&1

"""Sharded data parallel with FSDP2 (``fully_shard``): ZeRO-2, ZeRO-3 and CPU offload.

- ``fsdp``            : params, grads, optimizer states sharded; params re-gathered in backward (ZeRO-3).
- ``low_level_zero 2``: same sharding but params stay gathered between forward and backward
                        (``reshard_after_forward=False``): ZeRO-2's memory, no extra all-gather.
- ``gemini``          : ZeRO-3 with every shard (params, grads, Adam states) living on the CPU in
                        pinned memory; FSDP2 streams each block to the GPU just in time, and the
                        optimizer steps on the CPU.
Each transformer block is one FSDP unit, so communication overlaps the next block's compute.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from .tensor import find_blocks


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True, cpu_offload: bool = False) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kw = dict(mesh=dp_mesh, mp_policy=mp, offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
              if cpu_offload else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    blocks = find_blocks(model)
    for i, (_, block) in enumerate(blocks):
        # the last block's params are needed right away in backward: never reshard them
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model

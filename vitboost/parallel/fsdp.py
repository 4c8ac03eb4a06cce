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
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

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


class ReducedGradNorm:
    """The global gradient norm, summed on the GPU as FSDP reduces each unit's gradient, before the
    gradient is copied to the CPU.

    Why: under gemini the gradients land on the CPU, where their norm cost ~10 ms of 16 cores per ViT-B
    step (BENCHMARKS.md section 29); on the GPU it is ~0.1 ms, inside the backward. FSDP2's
    ``set_all_reduce_hook`` hands each unit's reduce-scattered shard to ``_add`` in the reduce stream:
    fp32 (``apply_fsdp`` reduces in fp32, so the shard is already averaged: no divide follows), its
    padding zeros. The squares add over units here and over data-parallel ranks in ``pop``. Only for
    FSDP over data parallel alone: a TP shard or a pipeline stage would need its own reduction.
    """

    @staticmethod
    def available() -> bool:
        """FSDP2's all-reduce hook arrived in torch 2.7; on 2.6 gemini reads the norm over the CPU grads."""
        return hasattr(FSDPModule, "set_all_reduce_hook")

    def __init__(self, model: nn.Module, dp_mesh: DeviceMesh):
        self._group = dp_mesh.get_group() if dp_mesh.size() > 1 else None
        self._squares: Tensor | None = None
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_all_reduce_hook(self._add)

    def _add(self, shard: Tensor) -> None:
        squares = torch.linalg.vector_norm(shard, dtype=torch.float32).square()
        self._squares = squares if self._squares is None else self._squares + squares

    def pop(self) -> Tensor:
        """The norm of the gradients reduced since the last pop, on the CPU (where gemini's step reads it;
        FSDP's end of backward has already waited for the reduce stream)."""
        squares, self._squares = self._squares, None
        if squares is None:
            return torch.zeros(())
        if self._group is not None:
            dist.all_reduce(squares, group=self._group)
        return squares.sqrt().cpu()

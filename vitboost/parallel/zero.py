"""ZeRO stage 1: DDP keeps full params and grads; each rank owns 1/dp of the Adam states.

``ZeroRedundancyOptimizer`` steps only its partition and broadcasts the updated params.
Stage 2 is FSDP2 without reshard-after-forward (see fsdp.py).
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.optim import ZeroRedundancyOptimizer


def zero1_optimizer(param_groups: list[dict], dp_mesh: DeviceMesh, **adamw_kwargs) -> ZeroRedundancyOptimizer:
    first, *rest = param_groups
    opt = ZeroRedundancyOptimizer(first["params"], optimizer_class=torch.optim.AdamW,
                                  process_group=dp_mesh.get_group(), parameters_as_bucket_view=False,
                                  **{**adamw_kwargs, **{k: v for k, v in first.items() if k != "params"}})
    for group in rest:
        opt.add_param_group(group)
    return opt

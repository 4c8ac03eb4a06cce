"""Gradient clipping by the global norm, for every strategy (``Engine.step``).

The norm is global: over DTensor shards (FSDP, TP) and over pipeline stages, so every rank
scales by the same factor a single process would. It is computed on the local shards
(``DTensor.to_local()``): per-tensor norms, combined as a sum of p-th powers and all-reduced
over the mesh dimensions that shard the tensor (nothing for one rank), then over pp. This skips
DTensor's per-tensor dispatch and its per-norm Partial->Replicate reductions.

Two ways to apply the clip:

- :func:`clip_grad_norm_`: norm, then a multiply over every gradient (torch's semantics,
  any optimizer, CUDA-graph capturable: nothing leaves the device).
- :func:`fused_clip_step`: for a fused AdamW, on the GPU or the CPU (gemini's offloaded step). The
  clip factor (and, under fp16, the loss-scale unscale and the inf/nan skip) is handed to the
  fused kernel as ``grad_scale`` / ``found_inf``: the norm reads the gradients, AdamW reads them,
  and nothing else touches them (torch's way adds a multiply over them, fp16's unscale another).
  ``benchmarks/cpu_step.py`` measures it on the CPU, BENCHMARKS.md section 35 on the GPU.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["clip_grad_norm_", "grad_norm", "clip_coef", "fused_clip_step", "LossScale", "pp_process_group"]

# torch.nn.utils.clip_grads_with_norm_ uses the same epsilon
EPS = 1e-6


def pp_process_group(pp_mesh_or_group: DeviceMesh | dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The process group of the pipeline dimension: a 1-D pp mesh, a mesh with a 'pp' dim, or a group."""
    if pp_mesh_or_group is None:
        return dist.group.WORLD
    if isinstance(pp_mesh_or_group, DeviceMesh):
        mesh = pp_mesh_or_group
        if mesh.ndim > 1:
            if not mesh.mesh_dim_names or "pp" not in mesh.mesh_dim_names:
                raise ValueError("pass a 1-D pp mesh, or a mesh with a dimension named 'pp'")
            mesh = mesh["pp"]
        return mesh.get_group()
    return pp_mesh_or_group


def _local_shard(g: Tensor) -> tuple[Tensor, tuple]:
    """(local tensor, what to all-reduce it over): the mesh dims on which the tensor is sharded."""
    from torch.distributed.tensor import DTensor, Replicate
    if not isinstance(g, DTensor):
        return g, ()
    if any(p.is_partial() for p in g.placements):  # not seen for grads; make it exact anyway
        g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in g.placements])
    mesh = g.device_mesh
    # every placement that is not Replicate splits the tensor (Shard, and _StridedShard: FSDP over TP,
    # for which is_shard() is False): its local squares add up over that mesh dim
    return g.to_local(), tuple((mesh, d) for d, p in enumerate(g.placements) if not p.is_replicate())


def _rows(t: Tensor) -> Tensor:
    if t.ndim >= 2 and t.shape[0] > 1:
        return t.reshape(t.shape[0], -1)
    return t.reshape(-1, t.shape[-1]) if t.ndim >= 2 else t.reshape(1, -1)


def _norms(tensors: list[Tensor], norm_type: float) -> list[Tensor]:
    """Per-tensor p-norms in fp32. On CUDA: one multi-tensor kernel. On the CPU, a norm over a whole
    tensor runs on one thread (the kernel splits its work by output rows; one output, one thread) and
    sums millions of floats into few fp32 accumulators; norms of rows, then of those, can use every
    thread and are ~400x more accurate (benchmarks/cpu_step.py: 7e-8 vs 3e-5 relative to fp64 on
    ViT-B-shaped grads)."""
    if tensors[0].device.type != "cpu":
        return torch._foreach_norm(tensors, norm_type, dtype=torch.float32)
    rows = [torch.linalg.vector_norm(_rows(t), norm_type, dim=1, dtype=torch.float32) if t.numel()
            else torch.zeros(1) for t in tensors]  # an empty shard (more ranks than rows) adds nothing
    return torch._foreach_norm(rows, norm_type)


def grad_norm(grads: Iterable[Tensor], pp_group: DeviceMesh | dist.ProcessGroup | None = None,
              norm_type: float = 2.0) -> Tensor:
    """The global p-norm of ``grads`` (plain tensors or DTensors), as a 0-dim fp32 tensor that is
    the same on every rank. ``pp_group=None``: no reduction over pipeline stages."""
    norm_type = float(norm_type)
    inf = norm_type == float("inf")
    by_reduction: dict[tuple, list[Tensor]] = {}
    for g in grads:
        local, over = _local_shard(g)
        by_reduction.setdefault((over, local.device), []).append(local)
    parts = []
    for (over, _), tensors in by_reduction.items():
        norms = torch.stack(_norms(tensors, norm_type))
        part = norms.max() if inf else (norms ** norm_type).sum()
        for mesh, d in over:
            if mesh.size(d) > 1:
                dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=mesh.get_group(d))
        parts.append(part)
    device = parts[0].device if parts else torch.device("cpu")
    parts = [p.to(device) for p in parts]
    if not parts:
        total = torch.zeros((), device=device)
    else:
        total = torch.stack(parts).max() if inf else torch.stack(parts).sum()
    if pp_group is not None:
        group = pp_process_group(pp_group)
        if dist.get_world_size(group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    return total if inf else total ** (1.0 / norm_type)


def clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)): the factor ``torch.nn.utils.clip_grad_norm_`` applies."""
    return torch.clamp(max_norm / (total_norm + EPS), max=1.0)


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float,
                    pp_group: DeviceMesh | dist.ProcessGroup | None = None,
                    norm_type: float = 2.0, foreach: bool | None = None) -> Tensor:
    """Clip gradients by their global norm over every pp rank (and over DTensor meshes:
    FSDP shards / TP), so all ranks scale by the same factor a single process would.
    ``pp_group=None``: no pp reduction (a plain DTensor-aware clip).

    Returns the total norm (fp32 plain tensor, same on every rank).
    """
    params = [p for p in params if p.grad is not None]
    total = grad_norm([p.grad for p in params], pp_group, norm_type)
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total


class LossScale:
    """Dynamic fp16 loss scale with torch's GradScaler defaults and state_dict format
    (init 2**16, x2 after ``growth_interval`` steps without inf/nan, x0.5 on one), kept where the
    optimizer reads it: on the GPU beside the gradients, or on the CPU for gemini's offloaded step.
    The inf/nan check is ``fused_clip_step``'s: the global gradient norm is finite exactly when
    every gradient on every rank is (bar fp32 overflow of a norm beyond ~1e19), so all ranks agree
    without a separate all-reduce, and nothing waits for the host (a CUDA graph captures it all)."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, device: torch.device | str = "cpu"):
        self._scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def scale(self, loss: Tensor) -> Tensor:
        if self._scale.device.type == "cpu" and loss.device.type != "cpu":
            return loss * self._scale.item()  # a CPU float: no host-to-device copy, no sync
        return loss * self._scale

    def get_scale(self) -> float:
        return self._scale.item()

    def update(self, found_inf: Tensor) -> None:
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf.to(torch.float32),
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self._growth_tracker.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["_growth_tracker"]))
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = state["growth_interval"]


def fused_clip_step(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], max_norm: float,
                    pp_group: DeviceMesh | dist.ProcessGroup | None = None,
                    loss_scale: LossScale | None = None, norm: Tensor | None = None) -> Tensor:
    """Norm, clip, unscale, inf/nan skip and the optimizer step in one pass over the gradients.

    ``optimizer`` must be a fused Adam/AdamW (it reads ``grad_scale``/``found_inf``: it divides
    every gradient by ``grad_scale`` and skips the whole step when ``found_inf`` is 1). With
    c = min(1, max_norm / (norm + 1e-6)) and loss scale S (1 without one), grad_scale = S / c.
    ``norm``: the global norm of these (scaled) gradients when already known, on their device
    (``ReducedGradNorm``: gemini sums it on the GPU during the backward); else it is computed here.
    Returns the global norm of the unscaled gradients, as ``clip_grad_norm_`` would.
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError("fused_clip_step needs an optimizer built with fused=True")
    if norm is None:
        norm = grad_norm([p.grad for p in params if p.grad is not None], pp_group)  # scaled under fp16
    device = norm.device
    if loss_scale is not None:
        scale = loss_scale._scale.to(device)
        found_inf = (~torch.isfinite(norm)).to(torch.float32)
        norm = norm / scale
        grad_scale = scale / clip_coef(norm, max_norm)
    else:
        found_inf = None
        grad_scale = 1.0 / clip_coef(norm, max_norm)
    optimizer.grad_scale, optimizer.found_inf = grad_scale.to(torch.float32), found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    if loss_scale is not None:
        loss_scale.update(found_inf)
    return norm

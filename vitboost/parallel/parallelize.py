"""The one place where a model becomes parallel, always in the same order (as torchtitan):

    tensor parallel (or else one GEMM for q, k, v and the last block for the CLS token only)
    -> activation checkpointing -> torch.compile -> FSDP2 / DDP

TP first, because it rewrites the linears that the others wrap (without TP, the attention's q, k and v
become one GEMM instead: TP's colwise split and that fusion are two answers for the same linears, and
the fusion must precede compile so the compiled graph holds it; the residual stream's cast to the
autocast dtype hooks the embeddings before compile for the same reason); activation checkpointing
and compile per block, so that FSDP's per-block units see compiled, checkpointed blocks;
data parallel last, because it must see the final parameters. Pipeline splitting happens
before all of this (each rank parallelizes only its own stage's part).
"""
from __future__ import annotations

import torch
from torch import nn

from .dims import ParallelDims
from .ddp import apply_ddp
from .fsdp import apply_fsdp
from .plan import Plan
from ..model import ClassTokenBlock, class_token_last_block, fuse_qkv, low_precision_residual_stream
from .tensor import apply_tensor_parallel, find_blocks


def parallelize(model: nn.Module, dims: ParallelDims, plan: Plan, device: torch.device, *,
                grad_checkpoint: bool = False) -> nn.Module:
    mesh = dims.mesh
    if dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"])
    else:  # nothing shards q, k and v apart: one GEMM for the three
        fuse_qkv(model)
        class_token_last_block(model)  # the last block for the CLS token only (what the classifier reads)
    low_precision_residual_stream(model)  # the stream in autocast's bf16/fp16, as under FSDP
    if grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if plan.compile == "blocks":  # FSDP/TP/PP units; a single module is compiled whole by the Engine
        for _, block in find_blocks(model):
            if not isinstance(block, ClassTokenBlock):  # its own code: a second graph to compile, for ~1/15 of
                block.compile()                          # the work, mostly one GEMM and SDPA that compile keeps
    if plan.data_parallel == "fsdp":
        return apply_fsdp(model, mesh["dp"], param_dtype=plan.dtype, cpu_offload=plan.cpu_offload,
                          reshard_after_forward=plan.reshard_after_forward)
    if plan.data_parallel == "ddp":
        return apply_ddp(model, mesh["dp"], device)
    return model  # "none": a data-parallel group of one rank gets no wrapper

"""Megatron-style tensor parallelism for HF ViT, built on DTensor ``parallelize_module``.

Inside each transformer block, q/k/v and the MLP's first linear are split by
output features (colwise) and the attention output and the MLP's second linear
by input features (rowwise), so a block costs two all-reduces forward (after
each rowwise linear) and two backward (at the attention and the MLP inputs).
Activations between modules stay plain local tensors, as in torchtitan's
``apply_tp``.

Everything else (embeddings, layernorms, classifier) is replicated, but its
parameters are made ``Replicate`` DTensors on the TP mesh, so that every
parameter is a DTensor: foreach AdamW, ``clip_grad_norm_`` and FSDP2 then see one
kind of parameter. These replicated modules take and return plain tensors, so
callers never see a DTensor activation.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._pytree import tree_map_only

from ..model import linear_patch_embedding

# Known block layouts (names relative to a ViTLayer), keyed by the attention module
# that owns q/k/v. transformers 4.x, then 5.x (checked identical in 5.17 and 5.24).
_LAYOUTS: tuple[dict[str, Any], ...] = (
    dict(attention="attention.attention",
         colwise=("attention.attention.query", "attention.attention.key",
                  "attention.attention.value", "intermediate.dense"),
         rowwise=("attention.output.dense", "output.dense"),
         mlp_in="intermediate.dense"),
    dict(attention="attention",
         colwise=("attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"),
         rowwise=("attention.o_proj", "mlp.fc2"),
         mlp_in="mlp.fc1"),
)
# Attributes the attention reads to reshape q/k/v or its output: per rank they shrink by tp.
_HEAD_ATTRS = ("num_attention_heads", "num_heads", "all_head_size")


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of a (possibly pipeline-pruned) ViT, in model order.

    A block is an entry of an ``nn.ModuleList``/``nn.ModuleDict`` that has an
    ``attention`` child; found by structure so any transformers version and any
    subset of layers (e.g. a ModuleDict keyed by original indices) works.
    """
    blocks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            prefix = f"{name}." if name else ""
            blocks += [(prefix + key, child) for key, child in mod.named_children()
                       if isinstance(getattr(child, "attention", None), nn.Module)]
    return blocks


def _layout(block: nn.Module) -> dict[str, Any]:
    """The entry of ``_LAYOUTS`` whose linears all exist in ``block``."""
    linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    for layout in _LAYOUTS:
        if linears.issuperset(layout["colwise"] + layout["rowwise"]):
            return layout
    raise ValueError(f"unknown ViT block layout ({type(block).__name__} with linears "
                     f"{sorted(linears)}); add it to vitboost.parallel.tensor._LAYOUTS")


def _check_divisible(block_name: str, block: nn.Module, layout: dict[str, Any], tp: int) -> None:
    """Heads and MLP width must split evenly over tp ranks; say how to fix it if not."""
    attn = block.get_submodule(layout["attention"])
    heads = next((getattr(attn, a) for a in _HEAD_ATTRS if hasattr(attn, a)), None)
    if heads is None:
        raise ValueError(f"{type(attn).__name__} has none of {_HEAD_ATTRS}; cannot shard its heads")
    inter = block.get_submodule(layout["mlp_in"]).out_features
    if heads % tp or inter % tp:
        ok = [d for d in range(1, heads + 1) if heads % d == 0 and inter % d == 0]
        raise ValueError(
            f"tensor parallel size {tp} must divide num_attention_heads={heads} and "
            f"intermediate_size={inter} (block {block_name}); use --tp_size in {ok}")


def _inputs_to_replicate(mesh: DeviceMesh, _module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Forward pre-hook: plain tensor inputs become Replicate DTensors (no check, no comm)."""
    return tree_map_only(torch.Tensor, lambda t: t if isinstance(t, DTensor) else
                         DTensor.from_local(t, mesh, [Replicate()], run_check=False), (args, kwargs))


def _hidden_to_replicate(mesh: DeviceMesh, _module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Forward pre-hook on the attention: q, k and v share one Replicate DTensor input,
    so backward sums their partial input grads first and all-reduces once, not thrice."""
    hidden, *rest = args
    return (DTensor.from_local(hidden, mesh, [Replicate()], run_check=False), *rest), kwargs


def _outputs_to_local(_module: nn.Module, _args: tuple, output: Any) -> Any:
    """Forward hook: DTensor outputs go back to plain (replicated) local tensors."""
    return tree_map_only(DTensor, lambda t: t.to_local(), output)


def _replicate(module: nn.Module, mesh: DeviceMesh, sharded: set[nn.Module]) -> None:
    """Make every parameter outside the sharded linears a Replicate DTensor.

    The largest subtrees without sharded linears become units: their parameters are
    replicated and hooks turn plain inputs into Replicate DTensors and outputs back
    into local tensors. In backward the colwise inputs all-reduce their partial
    grads, so these parameters get the same, full gradient on every TP rank.
    """
    if module in sharded:
        return
    if not any(m in sharded for m in module.modules()):
        if any(True for _ in module.parameters()):
            distribute_module(module, mesh)  # default partition: replicate params and buffers
            module.register_forward_pre_hook(partial(_inputs_to_replicate, mesh), with_kwargs=True)
            module.register_forward_hook(_outputs_to_local)
        return
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(f"{type(module).__name__} holds parameters {own} next to sharded "
                         "layers; tensor parallel cannot replicate them")
    for child in module.children():
        _replicate(child, mesh, sharded)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard every ViT block of ``model`` over ``tp_mesh`` in place; replicate the rest.

    Works on a whole model or a pipeline stage (embeddings/classifier absent, layers
    a subset). Raises ValueError before changing anything if heads or the MLP width
    do not divide by the TP size.
    """
    tp = tp_mesh.size()
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError(f"no ViT blocks found in {type(model).__name__}")
    layouts = [_layout(block) for _, block in blocks]
    for (name, block), layout in zip(blocks, layouts):
        _check_divisible(name, block, layout, tp)

    # the patchify conv as one matmul (vitboost's models have it already): torch 2.11's DTensor conv backward
    # marks a replicated weight's gradient Partial while each rank holds the full sum, which doubled the
    # gradient norm and skewed the clip (tests/test_tensor_parallel.py on torch 2.11; fixed by 2.13)
    linear_patch_embedding(model)
    sharded: set[nn.Module] = set()
    for (_, block), layout in zip(blocks, layouts):
        plan = {n: ColwiseParallel() for n in layout["colwise"]}
        plan.update({n: RowwiseParallel() for n in layout["rowwise"]})
        parallelize_module(block, tp_mesh, plan)
        sharded.update(block.get_submodule(n) for n in plan)
        # q/k/v now hold heads/tp heads per rank: the reshapes must use the local count.
        attn = block.get_submodule(layout["attention"])
        attn.register_forward_pre_hook(partial(_hidden_to_replicate, tp_mesh), with_kwargs=True)
        for attr in _HEAD_ATTRS:
            if hasattr(attn, attr):
                setattr(attn, attr, getattr(attn, attr) // tp)
    _replicate(model, tp_mesh, sharded)

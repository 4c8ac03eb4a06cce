"""Regularizers for training ViTs on small data from scratch: stochastic depth and weight EMA.

Both keep the model a plain ``ViTForImageClassification``: drop-path replaces the residual
branches' ``nn.Dropout`` modules (no parameters, so names, checkpoints and export are
untouched), and the EMA is a list of tensors beside the parameters, saved in the checkpoint
under its own key and exported in place of the raw weights.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016; timm's DropPath): in training, drop a whole residual
    branch for a random subset of the samples and rescale the rest by 1/(1-p). Wraps the
    dropout it replaces, which still runs first.

    The keep probability is a 0-dim buffer, not a Python float: torch.compile specializes on
    float attributes, so blocks with different rates each compiled their own graph (8 compiles,
    then dynamo's recompile limit left the deeper blocks eager). As a tensor every block shares one
    graph (the first block's rate 0 then draws a mask of ones: three tiny kernels, one graph fewer).
    Non-persistent: state dicts, checkpoints and export do not see it.
    """

    def __init__(self, p: float, inner: nn.Module | None = None, device: torch.device | None = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        self.p, self.inner = float(p), inner if inner is not None else nn.Identity()
        self.register_buffer("keep", torch.tensor(1.0 - p, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inner(x)
        if not self.training:
            return x
        keep = self.keep.to(x.device)  # a no-op, except under CPU offload (gemini): the buffer may stay there
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * mask.bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def residual_dropouts(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the dropouts that sit on a block's residual branches.

    transformers 5.x: ``ViTLayer.dropout``, applied to both branches just before each residual
    add. 4.x: ``attention.output.dropout`` (added in ViTLayer) and ``output.dropout`` (added in
    ViTOutput). Found from the module tree, never from a version number.
    """
    if isinstance(getattr(block, "dropout", None), (nn.Dropout, DropPath)):
        return [(block, "dropout")]
    found = []
    for parent in (getattr(getattr(block, "attention", None), "output", None), getattr(block, "output", None)):
        if parent is not None and isinstance(getattr(parent, "dropout", None), (nn.Dropout, DropPath)):
            found.append((parent, "dropout"))
    return found


def apply_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last), as timm/DeiT.
    Returns the number of residual branches given a DropPath."""
    from .parallel.tensor import find_blocks
    if rate <= 0:
        return 0
    blocks = find_blocks(model)
    n = 0
    for i, (_, block) in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        sites = residual_dropouts(block)
        if not sites:
            raise ValueError(f"no residual dropout found in {type(block).__name__}; drop_path cannot be applied")
        device = next(block.parameters()).device  # where the rate buffer lives: with the block
        for parent, attr in sites:
            inner = getattr(parent, attr)
            setattr(parent, attr, DropPath(p, inner.inner if isinstance(inner, DropPath) else inner, device))
            n += 1
    return n


class EMA:
    """Exponential moving average of the trainable parameters (decay per optimizer step).

    Updated on the device with one foreach kernel after each step (inside the CUDA graph when the
    step is one). Under FSDP/TP the parameters and their averages are DTensors with the same
    placements, so the kernels run on the local shards (DTensor has no rule for ``_foreach_copy_``).
    ``swapped()`` runs eval on the averaged weights and puts the trained ones back.
    """

    def __init__(self, named_params: list[tuple[str, Tensor]], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(local_shards(self.shadow), local_shards(self.params), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """FQN -> averaged tensor: the live tensors, so DCP loads into them in place."""
        return dict(zip(self.names, self.shadow))

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        params = local_shards(self.params)
        backup = [p.clone() for p in params]
        torch._foreach_copy_(params, local_shards(self.shadow))
        try:
            yield
        finally:
            torch._foreach_copy_(params, backup)


def local_shards(tensors: list[Tensor]) -> list[Tensor]:
    """Detached local shards of DTensors (FSDP/TP), plain tensors as they are."""
    from torch.distributed.tensor import DTensor
    return [(t.to_local() if isinstance(t, DTensor) else t).detach() for t in tensors]

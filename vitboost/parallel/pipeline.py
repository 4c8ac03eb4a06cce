"""Pipeline parallelism for HF ViT classifiers on torch.distributed.pipelining.

The tracer front-end (``pipeline()``/``SplitPoint``) breaks on HF models, so, like
torchtitan, we build ``PipelineStage`` objects by hand:

* :func:`split_model` prunes the model in place to what one pp rank needs. The
  blocks container becomes an ``nn.ModuleDict`` keyed by the original indices, so
  ``state_dict()`` keys stay those of the unsplit model (checkpoints move freely
  between pp and non-pp runs). The model's class is swapped for a subclass whose
  ``forward(hidden, pp_stage=None)`` runs one stage; going through the model's own
  ``__call__`` keeps FSDP2's root hooks (unshard, gradient reduce) working.
* :class:`PipelineRunner` builds stages and schedules over that model and exposes
  ``step()`` (train) and ``forward()`` (eval), with the loss returned on every
  pp rank.
* Clipping by the norm over ALL pp ranks (and DTensor meshes) lives in :mod:`vitboost.parallel.clip`.

Gradient scaling: schedules run with ``scale_grads=False`` and the loss of each
microbatch is divided by ``n_microbatches`` before backward. With a mean
``loss_fn`` and equal microbatches, the summed gradient is exactly the gradient
of the batch mean, on every stage, however many stages share one model object.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from .clip import pp_process_group as _pp_group

__all__ = ["StageSpec", "split_model", "PipelineRunner", "SCHEDULES"]

SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")
_MAX_CACHED_SCHEDULES = 8  # one per (train/eval, shape, dtype, autocast) seen


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: its global index and the original block indices it runs."""

    index: int
    num_stages: int
    block_keys: tuple[str, ...]

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


# ----------------------------------------------------------------------------- splitting

def _find_blocks_container(model: nn.Module) -> str:
    """Dotted path of the ModuleList of transformer blocks (vit.layers in 5.x, vit.encoder.layer in 4.x)."""
    if isinstance(model, _PipelinedMixin):
        raise ValueError("model is already split for pipeline parallelism; split the full model once")
    n_layers = model.config.num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and name.startswith("vit."):
            return name
    raise ValueError(f"no ModuleList of {n_layers} blocks found under model.vit; is this a HF ViT classifier?")


def _balance(n_blocks: int, n_stages: int) -> list[int]:
    """Blocks per stage: as even as possible; leftover blocks go to middle stages first,
    then the last, then the first stage (those also carry the head / the embeddings)."""
    sizes = [n_blocks // n_stages] * n_stages
    order = list(range(1, n_stages - 1)) + ([n_stages - 1, 0] if n_stages > 1 else [0])
    for i in order[: n_blocks % n_stages]:
        sizes[i] += 1
    return sizes


def _stage_ids(pp_rank: int, pp_size: int, stages_per_rank: int, layout: str) -> list[int]:
    """Global stage indices owned by ``pp_rank``: "loop" puts stage s on rank s % pp_size."""
    if layout != "loop":
        raise ValueError(f"layout {layout!r} is not supported; use 'loop' (stage s on rank s % pp_size)")
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


class _PipelinedMixin:
    """Mixed into the model's class by split_model: forward runs one pipeline stage.

    Stage 0 runs the embeddings, every stage its blocks, the last stage the final
    layernorm, the CLS token and the classifier. Intermediate outputs are the
    hidden states tensor [mb, tokens, hidden].
    """

    _pp_stages: list[StageSpec]
    _pp_blocks_path: str

    def forward(self, hidden: Tensor, pp_stage: int | None = None) -> Tensor:  # type: ignore[override]
        if pp_stage is None:
            if len(self._pp_stages) != 1:
                raise ValueError("this model part holds several stages; pass pp_stage=<global stage index>")
            spec = self._pp_stages[0]
        else:
            spec = next(s for s in self._pp_stages if s.index == pp_stage)
        vit = self.vit
        if spec.is_first:
            # same cast as HF ViTModel.forward (images in fp32, weights maybe bf16)
            hidden = hidden.to(vit.embeddings.patch_embeddings.projection.weight.dtype)
            hidden = vit.embeddings(hidden)
        blocks = self.get_submodule(self._pp_blocks_path)
        for key in spec.block_keys:
            out = blocks[key](hidden)
            hidden = out[0] if isinstance(out, (tuple, list)) else out  # 4.x returns a tuple
        if spec.is_last:
            hidden = self.classifier(vit.layernorm(hidden)[:, 0])
        return hidden


_PIPELINED_CLASSES: dict[type, type] = {}


def _pipelined_class(cls: type) -> type:
    """A subclass with the same name, so HF code that reads the class name (config.architectures) is unaffected."""
    if cls not in _PIPELINED_CLASSES:
        _PIPELINED_CLASSES[cls] = type(cls.__name__, (_PipelinedMixin, cls),
                                       {"__qualname__": cls.__qualname__, "__module__": cls.__module__})
    return _PIPELINED_CLASSES[cls]


def split_model(model: nn.Module, pp_rank: int, pp_size: int, stages_per_rank: int = 1,
                layout: str = "loop") -> tuple[nn.Module, list[StageSpec]]:
    """Prune ``model`` IN PLACE to the stages of ``pp_rank``; return (model_part, stage specs).

    Deep-copy first if you still need the full model. Embeddings stay only on the
    rank of stage 0, layernorm + classifier only on the rank of the last stage
    (others are set to None); the blocks container becomes a ModuleDict keyed by the
    original indices, so state_dict keys are a subset of the full model's.
    """
    if not (0 <= pp_rank < pp_size) or stages_per_rank < 1:
        raise ValueError(f"need 0 <= pp_rank < pp_size and stages_per_rank >= 1, got "
                         f"pp_rank={pp_rank}, pp_size={pp_size}, stages_per_rank={stages_per_rank}")
    path = _find_blocks_container(model)
    blocks = model.get_submodule(path)
    n_stages = pp_size * stages_per_rank
    if len(blocks) < n_stages:
        raise ValueError(f"cannot split {len(blocks)} ViT blocks into {n_stages} pipeline stages "
                         f"(pp_size={pp_size} x stages_per_rank={stages_per_rank}); need >= 1 block per stage")
    sizes = _balance(len(blocks), n_stages)
    starts = [sum(sizes[:i]) for i in range(n_stages)]
    specs = [StageSpec(s, n_stages, tuple(str(i) for i in range(starts[s], starts[s] + sizes[s])))
             for s in _stage_ids(pp_rank, pp_size, stages_per_rank, layout)]

    keep = [k for spec in specs for k in spec.block_keys]
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, nn.ModuleDict({k: blocks[int(k)] for k in keep}))
    if not any(s.is_first for s in specs):
        model.vit.embeddings = None
    if not any(s.is_last for s in specs):
        model.vit.layernorm = None
        model.classifier = None
    model.__class__ = _pipelined_class(type(model))
    model._pp_stages = specs
    model._pp_blocks_path = path
    return model, specs


# ----------------------------------------------------------------------------- running

class _StageView(nn.Module):
    """One of several stages sharing a model part: calls the part's forward (and so its
    FSDP hooks) for this stage. Holds no parameters of its own."""

    def __init__(self, root: nn.Module, stage_index: int) -> None:
        super().__init__()
        self.root = root
        self.stage_index = stage_index

    def forward(self, hidden: Tensor) -> Tensor:
        return self.root(hidden, pp_stage=self.stage_index)


def _autocast_key(device: torch.device) -> tuple:
    if torch.is_autocast_enabled(device.type):
        return (True, torch.get_autocast_dtype(device.type))
    return (False, None)


def _reshard(model: nn.Module) -> None:
    """Free FSDP's unsharded params after an eval forward (reshard_after_forward=False keeps
    them, and no backward follows to do it). Without this, model.parameters() would return
    the unsharded tensors, and an optimizer or checkpoint built afterwards would see those
    instead of the sharded DTensors that FSDP trains."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local(t: Tensor) -> Tensor:
    """DTensor logits (a TP'd classifier) -> the full plain tensor."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


class PipelineRunner:
    """Runs the stages of one pp rank with a torch.distributed.pipelining schedule.

    Microbatch constraints: the batch must split into ``n_microbatches`` equal
    microbatches; "1F1B" needs n_microbatches >= pp_size; "GPipe" any n;
    "Interleaved1F1B" needs stages_per_rank >= 2 and n_microbatches a multiple of
    pp_size when n_microbatches > pp_size (torch's rule: a multiple of
    n_microbatches // pp_size). Every pp rank must call step()/forward() with
    tensors of the same shape (only stage 0 reads the images, only the last stage
    the targets). A schedule (and its shape inference, which runs a real forward)
    is built once per distinct shape/dtype/autocast setting and cached.
    """

    def __init__(self, model_part: nn.Module, stages: list[StageSpec],
                 pp_mesh_or_group: DeviceMesh | dist.ProcessGroup | None, device: torch.device,
                 n_microbatches: int, schedule: str = "1F1B",
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pp schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.group = _pp_group(pp_mesh_or_group)
        self.pp_rank, self.pp_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if not stages:
            raise ValueError("no stages given; pass the specs returned by split_model")
        n_stages = stages[0].num_stages
        if n_stages != self.pp_size * len(stages) or any(s.index % self.pp_size != self.pp_rank for s in stages):
            raise ValueError(f"stage specs {[s.index for s in stages]} of {n_stages} do not belong to pp rank "
                             f"{self.pp_rank} of {self.pp_size}; call split_model with this rank and pp size")
        n = n_microbatches
        if n < 1:
            raise ValueError(f"n_microbatches must be >= 1, got {n}")
        if schedule == "Interleaved1F1B":
            if len(stages) < 2:
                raise ValueError("Interleaved1F1B needs stages_per_rank >= 2 (split_model(..., stages_per_rank=2)); "
                                 "use 1F1B or GPipe for one stage per rank")
            rounds = max(1, n // self.pp_size)
            if n % rounds:
                raise ValueError(f"Interleaved1F1B with pp_size={self.pp_size} needs n_microbatches a multiple "
                                 f"of pp_size (or < pp_size), got {n}")
        else:
            if len(stages) != 1:
                raise ValueError(f"{schedule} runs one stage per rank; split with stages_per_rank=1 "
                                 f"or use schedule='Interleaved1F1B'")
            if schedule == "1F1B" and n < self.pp_size:
                raise ValueError(f"1F1B needs n_microbatches >= pp_size ({self.pp_size}), got {n}")
        self.model_part, self.stages, self.device = model_part, stages, torch.device(device)
        self.n_microbatches, self.schedule_name, self.loss_fn = n, schedule, loss_fn
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)
        self._last_global = dist.get_global_rank(self.group, (n_stages - 1) % self.pp_size)
        # One stage: the stage module IS the (maybe FSDP) model part, so PipelineStage's
        # FSDP handling (no grad sync per microbatch, one reduce at the end) applies.
        # Several: thin views over the shared part (FSDP then reduces every microbatch).
        self._modules: list[nn.Module] = (
            [model_part] if len(stages) == 1 else [_StageView(model_part, s.index) for s in stages])
        self._cache: dict[tuple, object] = {}

    def _scaled_loss(self, output: Tensor, target: Tensor) -> Tensor:
        # mean over a microbatch / n_microbatches, summed over microbatches = mean over the batch
        return self.loss_fn(output, target) / self.n_microbatches

    def _schedule(self, key: tuple, train: bool):
        """Build (or reuse) fresh stages + a schedule for one input signature."""
        if key in self._cache:
            return self._cache[key]
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import (
            Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B)

        stages = [PipelineStage(m, s.index, s.num_stages, self.device, group=self.group)
                  for m, s in zip(self._modules, self.stages)]
        loss = self._scaled_loss if train else None  # no loss_fn: a forward-only run
        if self.schedule_name == "Interleaved1F1B":
            sched = ScheduleInterleaved1F1B(stages, self.n_microbatches, loss_fn=loss, scale_grads=False)
        else:
            cls = Schedule1F1B if self.schedule_name == "1F1B" else ScheduleGPipe
            sched = cls(stages[0], self.n_microbatches, loss_fn=loss, scale_grads=False)
        if len(self._cache) >= _MAX_CACHED_SCHEDULES:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = sched
        return sched

    def _run(self, sched, images: Tensor | None, **kwargs) -> Tensor | None:
        args = (images.to(self.device),) if self.has_first else ()
        if "return_outputs" in inspect.signature(sched.step).parameters and "target" in kwargs:
            kwargs["return_outputs"] = False  # train: don't keep the logits of every microbatch
        return sched.step(*args, **kwargs)

    def step(self, images: Tensor, targets: Tensor) -> Tensor:
        """Forward+backward of one batch; accumulates d(mean loss)/d(param) into .grad and
        returns the mean loss (detached, fp32, 0-dim) on every pp rank."""
        if not torch.is_grad_enabled():
            raise RuntimeError("PipelineRunner.step() needs autograd; it was called under no_grad. "
                               "Use PipelineRunner.forward() for evaluation")
        b = images.shape[0]
        if b % self.n_microbatches or targets.shape[0] != b:
            raise ValueError(f"batch of {b} images / {targets.shape[0]} targets does not split into "
                             f"{self.n_microbatches} equal microbatches; use a batch size that is a "
                             f"multiple of n_microbatches (and drop_last=True for training)")
        key = ("train", tuple(images.shape), images.dtype, tuple(targets.shape), targets.dtype,
               _autocast_key(self.device))
        sched = self._schedule(key, train=True)
        losses: list[Tensor] = []
        extra = {"target": targets.to(self.device), "losses": losses} if self.has_last else {}
        self._run(sched, images, **extra)
        if self.has_last:
            loss = torch.stack([l.detach().float() for l in losses]).sum().reshape(1)
        else:
            loss = torch.zeros(1, dtype=torch.float32, device=self.device)
        dist.broadcast(loss, src=self._last_global, group=self.group)
        return loss[0]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Eval logits [B, num_labels] (fp32) on every pp rank, for any B: the batch is
        padded to a multiple of n_microbatches and the padded rows dropped."""
        b, n = images.shape[0], self.n_microbatches
        padded = -(-b // n) * n
        if padded != b:
            images = torch.cat([images, images.new_zeros((padded - b, *images.shape[1:]))])
        key = ("eval", tuple(images.shape), images.dtype, _autocast_key(self.device))
        out = self._run(self._schedule(key, train=False), images)
        if self.has_last:
            logits = _local(out).float().contiguous()
        else:
            logits = torch.empty(padded, self.model_part.config.num_labels, device=self.device)
        dist.broadcast(logits, src=self._last_global, group=self.group)
        _reshard(self.model_part)
        return logits[:b]

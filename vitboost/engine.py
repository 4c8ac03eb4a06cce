"""Engine: runs any strategy behind a handful of calls, so the training loop never asks which.

    loss, grad_norm = engine.train_step([(images, targets), ...])   # one optimizer step
    logits = engine.logits(images)          # eval, full logits on every rank
    engine.model_state() / optim_state()    # FQN-keyed, for torch.distributed.checkpoint

Pipeline parallel is the one place the mechanics differ (a schedule drives forward and
backward over microbatches); that difference lives here, not in the loop. So does the speed
plan: a single module may be compiled whole (eval stays eager: no recompiles for its shapes)
and its step captured as one CUDA graph (vitboost.cuda_graph).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable

import torch
from torch import Tensor, nn

from .best import BestWeights
from .config import ConfigError, TrainConfig
from .parallel.dims import ParallelDims
from .parallel.parallelize import parallelize
from .parallel.clip import LossScale, clip_grad_norm_, fused_clip_step
from .parallel.fsdp import ReducedGradNorm
from .parallel.pipeline import PipelineRunner, split_model
from .parallel.plan import Plan
from .cuda_graph import GraphedStep
from .regularize import EMA

LossFn = Callable[[Tensor, Tensor], Tensor]


def param_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float | None = None,
                 num_layers: int = 0) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and the CLS token (as timm/DeiT).

    layer_decay (BEiT's layer-wise lr decay, timm's ``param_groups_layer_decay``): the head and final
    norm train at ``lr``, block i of ``num_layers`` at ``lr * layer_decay ** (num_layers - i)``, the
    embeddings one step further down, so a fine-tune moves the early, generic layers least. Layers
    are read from parameter names, which every strategy keeps (FSDP, TP, a pipeline stage, peft).
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "position_embeddings" in name or "cls_token" in name
        depth, scale = num_layers + 1, 1.0  # without layer decay: one lr, the two weight-decay groups
        if layer_decay is not None:
            depth = layer_id(name, num_layers)
            scale = layer_decay ** (num_layers + 1 - depth)
        group = groups.setdefault((depth, skip), {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                                  "lr": lr * scale})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[0]))]


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_layers + 1 for the rest (final norm, head)."""
    block = re.search(r"\.(?:layers|layer)\.(\d+)\.", name)  # transformers 5.x vit.layers, 4.x vit.encoder.layer
    if block:
        return int(block.group(1)) + 1
    return 0 if ".embeddings." in f".{name}" else num_layers + 1


class Engine:
    def __init__(self, model: nn.Module, cfg: TrainConfig, dims: ParallelDims, plan: Plan,
                 device: torch.device, loss_fn: LossFn):
        self.cfg, self.dims, self.plan, self.device, self.loss_fn = cfg, dims, plan, device, loss_fn
        mesh = dims.mesh
        self.runner = None
        stages = None
        if dims.pp_enabled:
            per_rank = 2 if cfg.pp_schedule == "Interleaved1F1B" else 1
            model, stages = split_model(model, mesh["pp"].get_local_rank(), dims.pp, stages_per_rank=per_rank)
        if not plan.cpu_offload:
            model.to(device)
        self.model = parallelize(model, dims, plan, device, grad_checkpoint=cfg.grad_checkpoint)
        # training forward: the whole module compiled; eval keeps the eager module
        self._forward = torch.compile(self.model) if plan.compile == "model" else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # gemini over data parallel alone: the gradient norm summed on the GPU in the backward, not over CPU grads
        self.reduced_norm = (ReducedGradNorm(self.model, mesh["dp"])
                             if plan.cpu_offload and not dims.tp_enabled and not dims.pp_enabled
                             and ReducedGradNorm.available() else None)
        trainable = [(n, p) for n, p in _unwrap(self.model).named_parameters() if p.requires_grad]
        self.ema = EMA(trainable, cfg.ema) if cfg.ema > 0 else None
        self.best = BestWeights(trainable, cfg.metric_for_best_model) if cfg.load_best_model_at_end else None
        self.optimizer = self._build_optimizer()
        self.scaler = self._build_scaler()
        self._accum = 1
        self.graphed = GraphedStep(self._one_step, self.optimizer) if plan.cuda_graph else None
        if stages is not None:
            mb = cfg.microbatch_size or max(1, cfg.batch_size // (2 * dims.pp))
            if cfg.batch_size % mb:
                raise ConfigError(f"--batch_size {cfg.batch_size} (per data-parallel rank) is not divisible by "
                                  f"--microbatch_size {mb}; the global batch must be a multiple of dp*microbatch")
            self.runner = PipelineRunner(self.model, stages, mesh["pp"], device, cfg.batch_size // mb,
                                         cfg.pp_schedule, loss_fn=self._pp_loss)
        self.pp_group = mesh["pp"].get_group() if dims.pp_enabled else None

    # -- construction -------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups(self.model, self.cfg.weight_decay, self.cfg.lr, self.cfg.layer_decay,
                              _unwrap(self.model).config.num_hidden_layers)
        # fused: one kernel for all params on GPU, a vectorized, multi-threaded step on the CPU, over plain
        # tensors or DTensors (FSDP, TP). It also applies the clip and fp16's unscale and inf/nan skip
        # (fused_clip_step), which is why sharded fp16 needs no ShardedGradScaler (whose found_inf of shape
        # [1] fused Adam rejected: sharded fp16 ran an unfused AdamW until session 20)
        kw = dict(lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), eps=self.cfg.adam_epsilon,
                  fused=True)
        if self.plan.zero1:
            from .parallel.zero import zero1_optimizer  # torch.distributed.optim: ~0.2 s of imports, for ZeRO-1 only
            return zero1_optimizer(groups, self.dims.mesh["dp"], **kw)
        return torch.optim.AdamW(groups, **kw)

    def _build_scaler(self):
        if self.plan.precision != "fp16":
            return None
        if self._fused_clip:
            # unscale, clip and the inf/nan skip ride in the fused AdamW step (fused_clip_step); every rank
            # of every layout agrees through the global norm (over FSDP/TP shards and pp stages), so sharded
            # grads need no all-reduce of their own. The scale lives with the step: on the CPU for gemini's
            # offloaded one, else on the device (no sync, capturable)
            return LossScale(device="cpu" if self.plan.cpu_offload else self.device)
        # ZeRO-1: ZeroRedundancyOptimizer wraps the AdamW; DDP's grads are whole and alike on every rank
        return torch.amp.GradScaler(self.device.type)

    def loss_scale(self) -> float | None:
        """fp16's loss scale now (a host sync: read at log rows only); None without one."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    @property
    def _fused_clip(self) -> bool:
        """A plain fused AdamW (not ZeRO-1's wrapper around one) takes the clip into its step."""
        return isinstance(self.optimizer, torch.optim.AdamW) and bool(self.optimizer.defaults.get("fused"))

    def autocast(self):
        if self.plan.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.plan.dtype)

    # -- training -----------------------------------------------------------------------
    def _pp_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = self.loss_fn(logits.float(), targets) / self._accum
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _no_sync(self, sync: bool):
        if sync:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def forward_backward(self, images: Tensor, targets: Tensor, accum: int = 1, sync: bool = True) -> Tensor:
        """Accumulate the gradient of mean_loss/accum for this rank's batch; returns mean_loss (detached)."""
        self.model.train()
        self._accum = accum
        if sync and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(True)
        with self._no_sync(sync):
            if self.runner is not None:
                with self.autocast():
                    loss = self.runner.step(images, targets)
                if self.scaler is not None:
                    loss = loss / self.scaler._scale.to(loss.device)
                return loss * accum
            with self.autocast():
                logits = self._forward(pixel_values=images).logits
            loss = self.loss_fn(logits.float(), targets)
            scaled = loss / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach()

    def train_step(self, micro_batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """One optimizer step over the micro-batches of gradient accumulation.

        Returns (mean loss, global grad norm) as device tensors: no host sync. Under a CUDA
        graph they are the graph's outputs, overwritten by the next step.
        """
        if self.graphed is not None:
            (x, y), = micro_batches
            return self.graphed(x, y)
        accum, total = len(micro_batches), None
        for i, (x, y) in enumerate(micro_batches):
            loss = self.forward_backward(x, y, accum, sync=i == accum - 1)
            total = loss if total is None else total + loss
        return total / accum, self.step()

    def _one_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_backward(x, y), self.step()

    def step(self) -> Tensor:
        """Clip, step, zero grads. Returns the global grad norm (a device tensor: no host sync)."""
        # the global norm over TP/FSDP shards and all pipeline stages; max_grad_norm <= 0: measure only
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        if self._fused_clip:
            # the clip factor (and fp16's unscale and inf/nan skip) rides in the fused AdamW: the norm and
            # the step read the grads, nothing else does (README; BENCHMARKS.md section 35)
            norm = fused_clip_step(self.optimizer, self.params, max_norm, self.pp_group, self.scaler,
                                   norm=self.reduced_norm.pop() if self.reduced_norm is not None else None)
        elif self.scaler is not None:  # ZeRO-1's wrapped optimizer
            self.scaler.unscale_(self.optimizer)
            norm = clip_grad_norm_(self.params, max_norm, self.pp_group)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            norm = clip_grad_norm_(self.params, max_norm, self.pp_group)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return norm

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        self.model.eval()
        eager = contextlib.nullcontext() if self.plan.compile_eval else torch.compiler.set_stance("force_eager")
        with self.autocast(), eager:
            if self.runner is not None:
                out = self.runner.forward(images)
            else:
                out = _unwrap(self.model)(pixel_values=images).logits  # skip DDP's wrapper in eval
        return out.float()

    def eval_weights(self):
        """Evaluate (and export) the EMA weights when there are any."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    # -- checkpoint state -----------------------------------------------------------------
    def model_state(self) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(self.model)

    def load_model_state(self, state: dict[str, Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(self.model, state)

    def optimizer_and_model(self):
        """What DCP's get/set_optimizer_state_dict need. ZeRO-1: the rank's local AdamW, which
        holds the states of the params this rank owns (saved keyed by FQN, merged on load)."""
        return (self.optimizer.optim if self.plan.zero1 else self.optimizer), self.model

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the module under .module


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int,
                kind: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup`` steps, then (as HF's get_scheduler) cosine or linear decay to 0,
    or a constant lr; "constant" has no warmup. Each param group keeps its own peak (layer decay)."""
    if kind == "constant":
        warmup = 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - progress if kind == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

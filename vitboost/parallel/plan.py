"""Plugin name -> Plan: what each ColossalAI-style plugin means in PyTorch-native terms.

A Plan is data, not code: ``parallelize()`` applies it and ``Engine`` runs it, so the
training loop never branches on the strategy.

| plugin            | data parallel          | extras                                   |
|-------------------|------------------------|------------------------------------------|
| torch_ddp         | DDP                    |                                          |
| torch_ddp_fp16    | DDP                    | fp16 autocast + loss scale               |
| low_level_zero 1  | DDP                    | ZeroRedundancyOptimizer (Adam states/dp) |
| low_level_zero 2  | FSDP2, no reshard      | grads + Adam states sharded              |
| fsdp              | FSDP2                  | params + grads + states sharded (ZeRO-3) |
| gemini            | FSDP2 + CPUOffload     | everything on CPU, optimizer on CPU      |
| hybrid_parallel   | FSDP2 over dp          | DTensor TP x torch.distributed.pipelining|

A data-parallel group of one rank gets no wrapper at all (``data_parallel="none"``): DDP, ZeRO and
FSDP over one rank shard nothing and communicate with nobody, yet FSDP's per-block hooks cost
3.9x on a small model (BENCHMARKS.md). Gemini keeps FSDP on one GPU: its CPU offload is the point.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Plan:
    plugin: str
    data_parallel: str  # "ddp" | "fsdp" | "none" (a data-parallel group of one rank)
    precision: str  # "fp32" | "bf16" | "fp16"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    zero1: bool = False
    reason: str = ""
    compile: str = "none"  # "none" | "blocks" (one graph all blocks share) | "model" (the whole single module)
    compile_eval: bool = False  # evaluation runs the compiled code too (else eagerly: see plan_step)
    cuda_graph: bool = False  # the whole step captured once and replayed (vitboost.cuda_graph)
    step_notes: tuple[str, ...] = ()  # what was chosen for the step and why, for the log

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def resolve_precision(requested: str, plugin: str, device_type: str) -> str:
    if plugin == "torch_ddp_fp16" and requested in ("auto", "fp16"):
        requested = "fp16"
    if requested == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise ConfigError("fp16 mixed precision needs a CUDA GPU (loss scaling on CPU is not supported); "
                          "use --mixed_precision fp32 or bf16 on CPU")
    return requested


def make_plan(cfg: TrainConfig, device_type: str, world_size: int, num_params: int = 0,
              model_dims: tuple[int, int, int, int] | None = None) -> Plan:
    plan = _plugin_plan(cfg, device_type, world_size, num_params, model_dims)
    dp = world_size // max(1, cfg.tp_size * cfg.pp_size)
    if dp == 1 and not plan.cpu_offload and plan.data_parallel != "none":
        # nothing to shard or all-reduce across one rank: run the module as it is
        return dataclasses.replace(plan, data_parallel="none", zero1=False, reshard_after_forward=False)
    return plan


def _plugin_plan(cfg: TrainConfig, device_type: str, world_size: int, num_params: int,
                 model_dims: tuple[int, int, int, int] | None) -> Plan:
    plugin, reason, zero_stage = cfg.plugin, "", cfg.zero_stage
    if plugin == "auto":
        plugin, reason = choose_auto(cfg, device_type, world_size, num_params, model_dims)
        zero_stage = 2
    precision = resolve_precision(cfg.mixed_precision, plugin, device_type)
    if plugin in ("torch_ddp", "torch_ddp_fp16"):
        return Plan(plugin, "ddp", precision, reason=reason)
    if plugin == "low_level_zero":
        if zero_stage == 1:
            return Plan(plugin, "ddp", precision, zero1=True, reason=reason)
        return Plan(plugin, "fsdp", precision, reshard_after_forward=False, reason=reason)
    if plugin == "fsdp":
        return Plan(plugin, "fsdp", precision, reason=reason)
    if plugin == "gemini":
        # one rank: nothing to reshard for others; keeping the gathered bf16 params from forward to backward
        # saves one host-to-device copy of the model per step (+20% on ViT-B, BENCHMARKS.md) for 2 bytes/param
        keep = world_size == 1 and device_type == "cuda" and 2 * num_params < 0.25 * torch.cuda.mem_get_info()[0]
        return Plan(plugin, "fsdp", precision, cpu_offload=True, reshard_after_forward=not keep, reason=reason)
    if plugin == "hybrid_parallel":
        # under PP the params are needed again in each microbatch's backward: keep them gathered
        return Plan(plugin, "fsdp", precision, reshard_after_forward=cfg.pp_size == 1, reason=reason)
    raise ConfigError(f"unknown --plugin {plugin!r}")


def model_dims(config) -> tuple[int, int, int, int]:
    """(hidden, layers, heads, tokens) of a ViT config: what the activation estimate needs."""
    return (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            (config.image_size // config.patch_size) ** 2 + 1)


def activation_bytes_per_image(hidden: int, layers: int, heads: int, tokens: int, grad_checkpoint: bool) -> float:
    """Megatron's estimate of saved activations per sample (bf16): (34*s*h + 5*a*s^2) bytes per layer."""
    per_layer = 34 * tokens * hidden + 5 * heads * tokens * tokens
    return (2 * tokens * hidden * layers + per_layer) if grad_checkpoint else per_layer * layers


def choose_auto(cfg: TrainConfig, device_type: str, world_size: int, num_params: int,
                model_dims: tuple[int, int, int, int] | None = None) -> tuple[str, str]:
    """The cheapest strategy whose memory fits: DDP > ZeRO-2 > FSDP > Gemini offload.

    Bytes per param: fp32 weights 4 + grads 4 + Adam 8 = 16. DDP keeps all 16 on every GPU,
    ZeRO-2 keeps weights (4) and 12/dp, FSDP 16/dp, Gemini ~0 (all on CPU). Activations are
    estimated with Megatron's formula; 80% of the free GPU memory is the budget.
    """
    if cfg.tp_size > 1 or cfg.pp_size > 1:
        return "hybrid_parallel", "auto: --tp_size/--pp_size given, so hybrid_parallel"
    if device_type != "cuda":
        return "torch_ddp", "auto: no GPU, so torch_ddp (nothing to save on CPU memory)"
    free, _ = torch.cuda.mem_get_info()
    budget = 0.8 * free
    act = 0.0
    if model_dims is not None:
        hidden, layers, heads, tokens = model_dims
        act = cfg.batch_size * activation_bytes_per_image(hidden, layers, heads, tokens, cfg.grad_checkpoint)
    p, n = num_params, world_size
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    options = [("torch_ddp", 16 * p), ("low_level_zero", 4 * p + 12 * p / n), ("fsdp", 16 * p / n)]
    for plugin, state in options:
        if state + act < budget:
            return plugin, (f"auto: {plugin}: model state {gib(state)} + activations {gib(act)} fit in "
                            f"80% of {gib(free)} free per GPU")
    return "gemini", (f"auto: gemini: even fully sharded, {gib(16 * p / n)} + activations {gib(act)} exceed "
                      f"80% of {gib(free)} free per GPU; offloading to CPU")


# What auto (and true) compile is each block: ViT's blocks are alike, so with the drop-path rate a
# tensor they share one graph, compiled once. On an H200 (BENCHMARKS.md section 21) that runs as fast
# as the whole model compiled (ViT-B b32 2,696 vs 2,682 img/s, vit-small b128 7,951 vs 8,005,
# vit-tiny@160 b128 5.42 vs 5.22 ms) and compiles in 3-7 s instead of 24-29 s. On top of a CUDA-graphed
# step it saves 2-8 ms a step: it pays back after ~400 steps (vit-small b128), ~900 (ViT-B b32), ~1,300
# (vit-tiny@160 b128) and ~3,100 (ViT-B b16: 2.0 ms saved for 6.2 s more warm-up, section 22). Auto
# compiles runs at least as long as the slowest of these, so no run gets slower.
COMPILE_PAYS_AFTER_STEPS = 3000


def plan_step(plan: Plan, cfg: TrainConfig, device_type: str, total_steps: int | None,
              eval_batches: int | None = None) -> Plan:
    """Decide --compile / --cuda_graph (auto, true, false) for this plan and run length; say why.
    eval_batches: the evaluation batches the run will take (None: many). Evaluation (eval mode, no
    grad) is a second graph to compile; it is compiled only when the run evaluates as many batches as
    a training run needs steps to pay back compiling, otherwise the compiled blocks run eagerly there
    (in the recipe, 13 evaluations of 133 images took 3.1 s, most of it that compile)."""
    from ..cuda_graph import graph_unsupported_reason
    notes = []
    single = plan.data_parallel == "none" and cfg.tp_size == 1 and cfg.pp_size == 1 and not plan.cpu_offload
    if cfg.compile in ("true", "blocks"):
        compile = "blocks"
    elif cfg.compile == "model":
        if not single:
            raise ConfigError("--compile model needs the model as one module (one data-parallel rank, no tp/pp, no "
                              "CPU offload); this layout compiles each block: use --compile blocks or true")
        compile = "model"
    elif cfg.compile == "false":
        compile = "none"
    elif device_type != "cuda":
        compile = "none"
        notes.append("compile: off (auto: no GPU)")
    elif total_steps is not None and total_steps < COMPILE_PAYS_AFTER_STEPS:
        compile = "none"
        notes.append(f"compile: off (auto: {total_steps} steps < {COMPILE_PAYS_AFTER_STEPS}, "
                     f"too short to pay back compilation)")
    else:
        compile = "blocks"
        notes.append(f"compile: blocks (auto: {total_steps or 'many'} steps pay back compiling one block)")
    why_not = graph_unsupported_reason(device_type=device_type, data_parallel=plan.data_parallel,
                                       tp=cfg.tp_size, pp=cfg.pp_size, cpu_offload=plan.cpu_offload,
                                       grad_accum=cfg.grad_accum)
    if cfg.cuda_graph == "true" and why_not:
        raise ConfigError(f"--cuda_graph true is not possible here: {why_not}; use --cuda_graph auto")
    graph = cfg.cuda_graph != "false" and why_not is None
    if cfg.cuda_graph == "auto":
        notes.append("cuda_graph: on (auto: the step runs in one process with no host sync)" if graph
                     else f"cuda_graph: off (auto: {why_not})")
    compile_eval = compile != "none" and (eval_batches is None or eval_batches >= COMPILE_PAYS_AFTER_STEPS)
    if compile != "none" and not compile_eval:
        notes.append(f"compile: evaluation runs eagerly ({eval_batches} batches < {COMPILE_PAYS_AFTER_STEPS}, "
                     f"too few to pay back compiling its graph)")
    return dataclasses.replace(plan, compile=compile, compile_eval=compile_eval, cuda_graph=graph,
                               step_notes=tuple(notes))

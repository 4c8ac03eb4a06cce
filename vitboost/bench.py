"""`vitboost bench`: training throughput, memory and MFU of one strategy on synthetic data.

Why synthetic data through the trainer's own Engine: the number must be the cost of
exactly the training step (``Engine.train_step``, with the compile / CUDA-graph choices a
long ``vitboost train`` run gets) with no data loading or augmentation in it, so strategies
compare on equal terms. ``--peers`` adds, in the same process and with the same batch, what
users try instead: HF ``ViTForImageClassification`` eager (the HF Trainer's step) and
compiled whole, timm's ViT under ``torch.compile``, and timm's whole step as one CUDA graph.

    vitboost bench --model vit-base -b 256 --peers --json out.json
    torchrun --nproc_per_node 2 -m vitboost bench --plugin fsdp -b 128 --csv results/bench.csv

Timing: warm-up steps are excluded (their total, compilation and graph capture included, is
``warmup_s``); the timed steps run back to back with no host sync, timed by CUDA events on
GPU and the host clock on CPU; the slowest rank's time counts.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .config import DEFAULT_PEAK_TFLOPS, ConfigError, TrainConfig, make_config

FIELDS = ("name", "model", "plugin", "strategy", "world_size", "dp", "tp", "pp", "precision", "batch_size",
          "global_batch", "params", "trainable_params", "steps", "warmup", "img_per_s", "img_per_s_per_gpu",
          "step_time_ms", "warmup_s", "gflop_per_image", "tflops_per_gpu", "mfu", "peak_gib_per_gpu",
          "state_gib_per_rank", "host_rss_gib", "compile", "grad_checkpoint", "loss", "device", "torch",
          "transformers", "date")


# ---------------------------------------------------------------------------------- FLOPs
def vit_flops_per_image(config: Any) -> float:
    """Model FLOPs of one training step per image: 3 x forward (backward costs two forwards).

    Forward = 2 x (params that sit in matmuls) x tokens + attention's QK^T and AV (4*L*s^2*h),
    the usual MFU convention (PaLM / Megatron): norms, softmax and other elementwise work are
    left out, and activation recomputation is not counted. ViT-B/16 at 224px: ~105.4 GFLOP.
    The last block is counted for every token, as the usual ViT counts (and every peer) do, though
    vitboost computes most of it for the CLS token only (model.ClassTokenBlock): the MFU it reports
    is per the model's standard FLOPs, so it compares across frameworks as img/s does.
    """
    h, layers, mlp = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    p, c = config.patch_size, getattr(config, "num_channels", 3)
    patches = (config.image_size // p) ** 2
    s = patches + 1  # + CLS token
    blocks = 2 * (4 * h * h + 2 * h * mlp) * s * layers + 4 * layers * s * s * h
    patch_embed = 2 * c * p * p * h * patches
    head = 2 * h * config.num_labels  # the CLS token only
    return 3.0 * (blocks + patch_embed + head)


# ---------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def time_steps(step: Callable[[], Tensor], steps: int, warmup: int,
               device: torch.device) -> tuple[float | None, float, Tensor]:
    """Run ``warmup`` then ``steps`` training steps; return (warm-up s, timed s, last loss).

    The warm-up time is every untimed step together: compilation and graph capture happen there.

    The timed loop never syncs with the host: on GPU, CUDA events bracket it, so the
    time is the GPU's; on CPU the host clock is the only clock.
    """
    first = None
    loss = torch.zeros(())
    _barrier()
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    _sync(device)
    if warmup:
        first = time.perf_counter() - t0
    _barrier()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            loss = step()
        end.record()
        end.synchronize()
        return first, start.elapsed_time(end) / 1e3, loss
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return first, time.perf_counter() - t0, loss


def _host_rss_bytes() -> int:
    """Resident host memory: what CPU offload (gemini) costs. psutil's current RSS, else peak RSS."""
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The slowest rank sets the job's step time; memory is reported for the fullest rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------- rows
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def _sig(v: float, digits: int = 4) -> float:
    """Significant digits, so tiny test models do not round to 0."""
    return float(f"{v:.{digits}g}")


def make_row(*, name: str, model: str, plugin: str, strategy: str, precision: str, world: int, dp: int, tp: int,
             pp: int, batch_size: int, steps: int, warmup: int, first_s: float | None, elapsed_s: float,
             flops_per_image: float, peak_tflops: float | None, peak_bytes: float | None, rss_bytes: float,
             compile: bool, state_bytes: float | None = None, grad_checkpoint: bool, loss: float,
             device: torch.device, params: int | None = None, trainable: int | None = None) -> dict[str, Any]:
    """One result. global_batch counts each image once: batch_size x dp (TP/PP ranks share images)."""
    import transformers
    global_batch = batch_size * dp
    img_per_s = global_batch * steps / elapsed_s
    achieved = flops_per_image * img_per_s / world  # FLOP/s per device
    return {
        "name": name, "model": model, "plugin": plugin, "strategy": strategy, "world_size": world,
        "dp": dp, "tp": tp, "pp": pp, "precision": precision, "batch_size": batch_size,
        "global_batch": global_batch, "params": params, "trainable_params": trainable, "steps": steps,
        "warmup": warmup,
        "img_per_s": round(img_per_s, 2), "img_per_s_per_gpu": round(img_per_s / world, 2),
        "step_time_ms": round(elapsed_s / steps * 1e3, 3),
        "warmup_s": None if first_s is None else round(first_s, 3),
        "gflop_per_image": _sig(flops_per_image / 1e9),
        "tflops_per_gpu": _sig(achieved / 1e12),
        "mfu": None if not peak_tflops else round(achieved / (peak_tflops * 1e12), 4),
        "peak_gib_per_gpu": None if peak_bytes is None else round(peak_bytes / 2**30, 3),
        "state_gib_per_rank": None if state_bytes is None else round(state_bytes / 2**30, 4),
        "host_rss_gib": round(rss_bytes / 2**30, 3),
        "compile": compile, "grad_checkpoint": grad_checkpoint, "loss": round(loss, 5),
        "device": _device_name(device), "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("name", "name"), ("strategy", "strategy"), ("world_size", "gpus"), ("precision", "prec"),
            ("global_batch", "batch"), ("trainable_params", "trainable"), ("img_per_s", "img/s"),
            ("img_per_s_per_gpu", "img/s/gpu"), ("step_time_ms", "step ms"), ("warmup_s", "warm-up s"), ("mfu", "mfu"),
            ("peak_gib_per_gpu", "peak GiB"), ("state_gib_per_rank", "state GiB"), ("host_rss_gib", "rss GiB")]
    cell = lambda v: "-" if v is None else f"{v:,.1f}" if isinstance(v, float) and v >= 100 else str(v)  # noqa: E731
    table = [[h for _, h in cols]] + [[cell(r[k]) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in table)


def write_json(rows: list[dict[str, Any]], path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rows, indent=2) + "\n")


def append_csv(rows: list[dict[str, Any]], path: str) -> None:
    """Append, keeping an existing file's header so a long-lived results file stays one table."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = list(FIELDS)
    new = not p.exists() or p.stat().st_size == 0
    if not new:
        with p.open(newline="") as f:
            fields = next(csv.reader(f), fields)
        missing = [k for k in FIELDS if k not in fields]
        if missing:
            print(f"note: {p} has an older header; not writing columns {', '.join(missing)}")
    with p.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        if new:
            w.writeheader()
        w.writerows(rows)


# ---------------------------------------------------------------------------------- runs
def synthetic_batch(batch: int, pre: Any, num_labels: int, device: torch.device,
                    seed: int) -> tuple[Tensor, Tensor]:
    """Random uint8 images, normalized on the device as the trainer does; random labels.

    Seeded by data-parallel rank, so the TP / PP ranks of one replica see the same images.
    """
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (batch, 3, pre.image_size, pre.image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_labels, (batch,), generator=g)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    x = (raw.to(device).float() / 255 - mean) / std
    return x, labels.to(device)


def _strategy_label(cfg: TrainConfig, plan: Any, dims: Any, mb: int | None) -> str:
    parts = [plan.plugin]
    if plan.plugin == "low_level_zero":
        parts.append(f"zero{cfg.zero_stage}")
    if dims.tp > 1:
        parts.append(f"tp{dims.tp}")
    if dims.pp > 1:
        parts.append(f"pp{dims.pp} mb{mb} {cfg.pp_schedule}")
    if plan.compile != "none":
        parts.append(f"+compile({plan.compile})")
    if plan.cuda_graph:
        parts.append("+cuda_graph")
    if cfg.grad_checkpoint:
        parts.append("+ckpt")
    if cfg.lora_rank:
        parts.append(f"+lora r{cfg.lora_rank}")
    return " ".join(parts)


def bench_vitboost(cfg: TrainConfig, args: argparse.Namespace, device: torch.device, rank: int,
                   world: int) -> tuple[dict[str, Any], Any, Any, tuple[Tensor, Tensor]]:
    """Time the Engine the trainer builds; returns (row, model config, preprocess, batch) for the peers."""
    from .augment import soft_cross_entropy
    from .engine import Engine
    from .lora import apply_lora
    from .model import build_model
    from .parallel.dims import ParallelDims
    from .parallel.plan import make_plan, model_dims, plan_step
    from .train import _check_layout, init_device, set_tf32

    say = print if rank == 0 else (lambda *a, **k: None)
    dims = ParallelDims(world, tp=cfg.tp_size, pp=cfg.pp_size)
    dims.build_mesh(device.type)
    dp_rank = dims.mesh["dp"].get_local_rank()
    torch.manual_seed(cfg.seed)  # identical init on every rank (FSDP / TP do not broadcast)
    model, pre = build_model(cfg.model, [str(i) for i in range(args.num_labels)], pretrained="none",
                             image_size=cfg.image_size, patch_size=cfg.patch_size, log=say,
                             device=init_device(device, cfg.plugin))
    model = apply_lora(model, cfg, say)
    _check_layout(cfg, model, dims)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = copy.deepcopy(model.config)
    plan = make_plan(cfg, device.type, world, sum(p.numel() for p in model.parameters()), model_dims(model.config))
    plan = plan_step(plan, cfg, device.type, None)  # auto: what a long training run gets
    set_tf32(cfg.tf32)
    for note in (plan.reason, *plan.step_notes):
        if note:
            say(note)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = Engine(model, cfg, dims, plan, device, soft_cross_entropy)
    mb = (cfg.microbatch_size or max(1, cfg.batch_size // (2 * dims.pp))) if dims.pp > 1 else None
    strategy = _strategy_label(cfg, plan, dims, mb)
    say(f"bench: {strategy} (dp={dims.dp} tp={dims.tp} pp={dims.pp}, {plan.precision}) on {world} x {device.type}, "
        f"batch {cfg.batch_size}/dp rank, {args.warmup} warm-up + {args.steps} timed steps")
    x, y = synthetic_batch(cfg.batch_size, pre, args.num_labels, device, seed=cfg.seed + dp_rank)

    def step() -> Tensor:
        return engine.train_step([(x, y)])[0]

    first, elapsed, loss = time_steps(step, args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1.0
    elapsed, first_m, peak, rss, state = _max_over_ranks([elapsed, -1.0 if first is None else first, peak,
                                                          _host_rss_bytes(), training_state_bytes(engine)], device)
    row = make_row(name="vitboost", model=cfg.model, plugin=plan.plugin, strategy=strategy, precision=plan.precision,
                   world=world, dp=dims.dp, tp=dims.tp, pp=dims.pp, batch_size=cfg.batch_size, steps=args.steps,
                   warmup=args.warmup, first_s=None if first is None else first_m, elapsed_s=elapsed,
                   flops_per_image=vit_flops_per_image(config), peak_tflops=_peak(args, device),
                   peak_bytes=None if peak < 0 else peak, rss_bytes=rss, compile=plan.compile != "none",
                   state_bytes=state, grad_checkpoint=cfg.grad_checkpoint, loss=float(loss), device=device,
                   params=params, trainable=trainable)
    return row, config, pre, (x, y)


def training_state_bytes(engine) -> float:
    """Bytes this rank keeps between steps for training state: its (shards of) parameters, a
    gradient for each trainable one (LoRA: adapters and head only), and the optimizer states it
    owns. Counted from the tensors, so ZeRO/FSDP savings are measured, not assumed; independent of
    the device, so CPU runs give the same numbers a GPU would (gemini keeps all of it on the CPU)."""
    from torch.distributed.tensor import DTensor

    def nbytes(t: Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in engine.model.parameters())
    grads = sum(nbytes(p) for p in engine.params)
    opt, _ = engine.optimizer_and_model()
    states = sum(nbytes(v) for st in opt.state.values() for v in st.values()
                 if isinstance(v, Tensor) and v.numel() > 1)
    return float(params + grads + states)


def _peak(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops or None
    return DEFAULT_PEAK_TFLOPS if device.type == "cuda" else None


def _plain_step(model: torch.nn.Module, forward: Callable[[], Tensor], lr: float, device: torch.device,
                dtype: torch.dtype | None, capturable: bool = False) -> Callable[[], Tensor]:
    """What the HF Trainer does per step: autocast forward, backward, clip to 1.0, AdamW, zero grads."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda", capturable=capturable)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


PEERS = {  # what a user would try instead, measured in the same process on the same batch
    "hf_eager": "HF ViTForImageClassification eager + AdamW (the HF Trainer's step)",
    "hf_compile": "HF ViTForImageClassification, whole model torch.compile + AdamW",
    "timm_compile": "timm VisionTransformer + torch.compile + AdamW",
    "timm_cudagraph": "timm VisionTransformer, whole step (fwd, bwd, clip, AdamW) as one CUDA graph",
}


def _timm_model(config: Any, device: torch.device) -> torch.nn.Module:
    import timm
    h = config.hidden_size
    with torch.device(device):
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=config.num_labels,
                                 img_size=config.image_size, patch_size=config.patch_size, embed_dim=h,
                                 depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                                 mlp_ratio=config.intermediate_size / h).train()


def _graphed(step: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """The anchor's recipe (shared/anchors/small_batch.py): warm up on a side stream, capture, replay."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        loss = step()

    def replay() -> Tensor:
        graph.replay()
        return loss
    return replay


def bench_peer(name: str, config: Any, batch: tuple[Tensor, Tensor], cfg: TrainConfig, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    """One peer of ``PEERS``, built as its users build it, timed like our row."""
    x, y = batch
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.manual_seed(cfg.seed)
    if name.startswith("hf_"):
        from transformers import ViTForImageClassification
        with torch.device(device):  # init where it trains, as our row does
            model = ViTForImageClassification._from_config(copy.deepcopy(config), attn_implementation="sdpa")
        model.train()
        fast = torch.compile(model) if name == "hf_compile" else model
        step = _plain_step(model, lambda: fast(pixel_values=x, labels=y).loss, cfg.lr, device, dtype)
    else:
        if name == "timm_cudagraph" and device.type != "cuda":
            raise RuntimeError("CUDA graphs need a GPU")
        model = _timm_model(config, device)
        fast = torch.compile(model) if name == "timm_compile" else model
        step = _plain_step(model, lambda: F.cross_entropy(fast(x).float(), y), cfg.lr, device, dtype,
                           capturable=name == "timm_cudagraph")
        if name == "timm_cudagraph":
            step = _graphed(step)
    first, elapsed, loss = time_steps(step, args.steps, args.warmup, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return make_row(name=name, model=cfg.model, plugin="none", strategy=PEERS[name],
                    precision="bf16" if dtype else "fp32", world=1, dp=1, tp=1, pp=1, batch_size=cfg.batch_size,
                    steps=args.steps, warmup=args.warmup, first_s=first, elapsed_s=elapsed,
                    flops_per_image=vit_flops_per_image(config), peak_tflops=_peak(args, device),
                    peak_bytes=peak, rss_bytes=_host_rss_bytes(), compile="compile" in name, grad_checkpoint=False,
                    loss=float(loss), device=device)


def _peer_rows(config: Any, batch: tuple[Tensor, Tensor], cfg: TrainConfig, args: argparse.Namespace,
               device: torch.device) -> list[dict[str, Any]]:
    import importlib.util
    rows = []
    names = args.peers or list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise ConfigError(f"unknown --peers {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    if device.type != "cuda":
        print("peers: on CPU only hf_eager (compiled and graphed peers are GPU measurements)")
        names = ["hf_eager"]
    if importlib.util.find_spec("timm") is None:
        print("peers: timm is not installed; no timm rows (pip install timm)")
        names = [n for n in names if not n.startswith("timm")]
    for name in names:
        _free(device)
        print(f"bench: peer {name}")
        try:
            rows.append(bench_peer(name, config, batch, cfg, args, device))
        except Exception as e:  # a peer's failure (OOM, compile error) must not lose the main result
            print(f"peers: {name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return rows


def run_bench(args: argparse.Namespace) -> int:
    from .parallel.dims import init_distributed, world_info
    from .train import pick_device

    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.num_labels < 1:
        raise ConfigError(f"--num_labels must be >= 1, got {args.num_labels}")
    keys = ("model", "image_size", "patch_size", "batch_size", "plugin", "zero_stage", "tp_size", "pp_size",
            "microbatch_size", "pp_schedule", "mixed_precision", "compile", "cuda_graph", "tf32", "grad_checkpoint",
            "device", "seed", "lora_rank", "lora_alpha", "lora_targets")
    cfg = make_config({"pretrained": "none", **{k: getattr(args, k) for k in keys}})
    rank, local_rank, world = world_info()
    device = pick_device(cfg.device, local_rank)
    owns_group = not dist.is_initialized()
    init_distributed(device.type)
    try:
        row, config, _, batch = bench_vitboost(cfg, args, device, rank, world)
        rows = [row]
        if args.peers is not None:
            if cfg.lora_rank:
                if rank == 0:
                    print("peers: skipped with --lora_rank (they time full fine-tuning)")
            elif world > 1:
                if rank == 0:
                    print(f"peers: skipped under {world} processes (they run single-process; "
                          f"run `vitboost bench --peers` without torchrun)")
            else:
                rows += _peer_rows(config, batch, cfg, args, device)
        if rank == 0:
            print(format_table(rows))
            if args.json:
                write_json(rows, args.json)
            if args.csv:
                append_csv(rows, args.csv)
        _barrier()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return 0

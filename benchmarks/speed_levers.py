"""Which levers move single-GPU training throughput, each measured in its own process.

    python benchmarks/speed_levers.py                              # the default list below
    python benchmarks/speed_levers.py --variants vit-base:256:blocks vit-base:256:whole --profile vit-base:256:blocks

A variant is MODEL:BATCH:HOW, where HOW is one of
  eager        the Engine as `vitboost train` builds it, no compile
  blocks       each transformer block compiled (what `--compile` does)
  blocks_ma    blocks compiled with mode="max-autotune-no-cudagraphs" (Triton GEMM templates, fused epilogues)
  blocks_ro    blocks compiled with mode="reduce-overhead" (CUDA graph trees)
  whole        the whole HF model compiled as one graph
  whole_ro     the whole model, mode="reduce-overhead"
  blocks_conv  blocks compiled, patch embedding left as HF's Conv2d (every other variant, like
               `vitboost train`, computes it as one matmul: model.PatchLinear)
  cudnn/flash  blocks compiled, SDPA restricted to the cuDNN / FlashAttention backend
  whole_cudnn, whole_flash, whole_ma   the whole model compiled, with cuDNN / Flash SDPA, or max-autotune
  gemini, gemini_fp16, gemini_keep     --plugin gemini on one GPU (bf16, fp16; keep: params stay gathered
               between forward and backward instead of a second host-to-device copy)
HOW may carry modifiers after a '+' (e.g. blocks+fp32res+cdt):
  fp32res      the residual stream as plain autocast leaves it, fp32 (VITBOOST_RESIDUAL_FP32=1); by default
               it is in the autocast dtype (model.low_precision_residual_stream)
  allbf16      the whole model's parameters in bf16 (an upper bound: AdamW on bf16 weights, no master copy)
  tma          Inductor's persistent TMA matmul templates (Hopper) beside cuBLAS, with max-autotune
  cdt          Inductor's coordinate-descent tuning of its Triton kernels
  clsfull      the last block computed for every token, as HF's (VITBOOST_CLS_ONLY=0); by default for the
               CLS token only (model.ClassTokenBlock), left uncompiled as `vitboost train` leaves it
  clscompiled  that CLS-only block compiled too (its own graph)
  nogelu, nonorm   bounds, not models: the MLP's GELU / every block's two LayerNorms replaced by the
               identity, so the step shows what no fusion of those kernels could beat
The train step is the Engine's (bf16 autocast, fused AdamW, grad clipping), on synthetic data
already on the GPU. `--profile` adds a kernel-time breakdown (GEMM, attention, fused Triton,
optimizer, other, and GPU idle) of one variant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])  # run from a checkout without installing
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT = ["vit-base:256:eager", "vit-base:256:blocks", "vit-base:256:blocks_conv", "vit-base:256:whole",
           "vit-base:256:cudnn", "vit-base:512:blocks", "vit-base:256:blocks_ma",
           "vit-small:128:eager", "vit-small:128:blocks", "vit-small:128:blocks_ro"]
MODIFIERS = {"fp32res", "allbf16", "tma", "cdt", "nogelu", "nonorm", "clsfull", "clscompiled"}
PEAK = 793e12  # measured bf16 GEMM rate of one H200 (the number); MFU below uses it


def free_kernels(model, mods) -> int:
    """The bounds `nogelu` / `nonorm`: each block's GELU / LayerNorms become the identity, so a step shows what
    no fusion of those kernels could beat. Returns how many modules were replaced."""
    import torch
    from vitboost.parallel.tensor import find_blocks
    replaced = 0
    for _, block in find_blocks(model):
        for name, sub in list(block.named_modules()):
            if ("nonorm" in mods and isinstance(sub, torch.nn.LayerNorm)
                    or "nogelu" in mods and "gelu" in type(sub).__name__.lower()):
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, torch.nn.Identity())
                replaced += 1
    return replaced


def build(model_name: str, batch: int, how: str):
    import torch
    from vitboost.augment import soft_cross_entropy
    from vitboost.bench import synthetic_batch, vit_flops_per_image
    from vitboost.config import make_config
    from vitboost.engine import Engine
    from vitboost.model import ClassTokenBlock, build_model
    from vitboost.parallel.dims import ParallelDims, init_distributed
    from vitboost.parallel.plan import make_plan, model_dims
    from vitboost.parallel.tensor import find_blocks

    how, *mods = how.split("+")
    if "fp32res" in mods:
        os.environ["VITBOOST_RESIDUAL_FP32"] = "1"
    if "clsfull" in mods:
        os.environ["VITBOOST_CLS_ONLY"] = "0"
    import torch._inductor.config as ic
    if "tma" in mods:
        ic.triton.enable_persistent_tma_matmul = True
        ic.max_autotune_gemm = True
    if "cdt" in mods:
        ic.coordinate_descent_tuning = True
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # cpu: smoke only
    init_distributed(device.type)
    gemini = how.startswith("gemini")
    cfg = make_config({"model": model_name, "pretrained": "none", "batch_size": batch,
                       "mixed_precision": "fp16" if how == "gemini_fp16" else "bf16",
                       "plugin": "gemini" if gemini else "torch_ddp"})
    dims = ParallelDims(1)
    dims.build_mesh(device.type)
    torch.manual_seed(0)
    model, pre = build_model(model_name, [str(i) for i in range(1000)], pretrained="none", log=lambda *a: None,
                             device=None if gemini or how == "blocks_conv" else device)
    flops = vit_flops_per_image(model.config)
    if how == "blocks_conv":  # undo what build_model does for every model: back to HF's Conv2d
        from vitboost.model import PatchLinear
        for m in model.modules():
            if isinstance(m, PatchLinear):
                m.__class__ = torch.nn.Conv2d
    if "allbf16" in mods:
        model.to(torch.bfloat16)
    free_kernels(model, mods)
    plan = make_plan(cfg, device.type, 1, sum(p.numel() for p in model.parameters()), model_dims(model.config))
    if how == "gemini_keep":
        import dataclasses
        plan = dataclasses.replace(plan, reshard_after_forward=False)
    engine = Engine(model, cfg, dims, plan, device, soft_cross_entropy)
    mode = {"blocks_ma": "max-autotune-no-cudagraphs", "blocks_ro": "reduce-overhead", "whole_ro": "reduce-overhead",
            "whole_ma": "max-autotune-no-cudagraphs"}
    if how in ("blocks", "blocks_conv", "blocks_ma", "blocks_ro", "cudnn", "flash"):
        for _, block in find_blocks(engine.model):
            if "clscompiled" in mods or not isinstance(block, ClassTokenBlock):  # as parallelize() does
                block.compile(mode=mode.get(how))
    elif how in ("whole", "whole_ro", "whole_ma", "whole_cudnn", "whole_flash"):
        engine._forward = torch.compile(engine.model, mode=mode.get(how))
    elif how != "eager" and not gemini:
        raise SystemExit(f"unknown variant {how!r}")
    x, y = synthetic_batch(batch, pre, 1000, device, seed=0)
    y = torch.nn.functional.one_hot(y, 1000).float()  # the trainer's soft targets (mixup / smoothing)

    def step():
        return engine.train_step([(x, y)])[0]

    sdpa = contextlib.nullcontext
    if how in ("cudnn", "flash", "whole_cudnn", "whole_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.CUDNN_ATTENTION if how.endswith("cudnn") else SDPBackend.FLASH_ATTENTION
        sdpa = lambda: sdpa_kernel([backend])  # noqa: E731
    return step, sdpa, flops


def profile(step, sdpa) -> dict:
    """GPU time per kernel family over 5 steps, and the share of the span the GPU sat idle."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof
    with sdpa():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    fam = {"gemm": 0.0, "attention": 0.0, "triton (fused elementwise/norm)": 0.0, "optimizer": 0.0,
           "conv (patch embed)": 0.0, "other": 0.0}
    start, end, busy = float("inf"), 0.0, 0.0
    names: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for e in p.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            cpu[e.name[:70]] = cpu.get(e.name[:70], 0.0) + e.self_cpu_time_total
            continue
        d = e.device_time if hasattr(e, "device_time") else e.cuda_time
        n = e.name.lower()
        start, end, busy = min(start, e.time_range.start), max(end, e.time_range.end), busy + d
        names[e.name[:90]] = names.get(e.name[:90], 0.0) + d
        key = ("attention" if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn")) else
               "gemm" if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "sm90", "matmul")) else
               "optimizer" if "adam" in n or "multi_tensor" in n else
               "conv (patch embed)" if "conv" in n or "implicit" in n or "wgrad" in n or "dgrad" in n else
               "triton (fused elementwise/norm)" if "triton" in n else "other")
        fam[key] += d
    span = end - start
    out = {k: round(v / 5 / 1e3, 2) for k, v in fam.items()}  # ms per step
    out["busy_ms"] = round(busy / 5 / 1e3, 2)
    out["span_ms"] = round(span / 5 / 1e3, 2)
    out["idle_share"] = round(1 - busy / span, 3) if span > 0 else None
    out["top"] = [(k, round(v / 5 / 1e3, 3)) for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:15]]
    out["top_cpu_self_ms"] = [(k, round(v / 5 / 1e3, 2)) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])[:10]]
    return out


def run_one(spec: str, steps: int, do_profile: bool) -> dict:
    import torch
    model_name, batch, how = spec.split(":")
    batch = int(batch)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    step, sdpa, flops = build(model_name, batch, how)
    with sdpa():
        step()
        sync()
        first = time.perf_counter() - t0
        for _ in range(4):
            step()
        sync()
        times = []
        for _ in range(3):  # three timed windows: the spread says what is noise
            h0 = time.perf_counter()
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            for _ in range(steps):
                loss = step()
            if cuda:
                b.record()
                b.synchronize()
            times.append((a.elapsed_time(b) / 1e3 if cuda else time.perf_counter() - h0) / steps)
    t = sorted(times)[1]
    row = {"variant": spec, "img_per_s": round(batch / t, 1), "step_ms": round(t * 1e3, 2),
           "spread_pct": round((max(times) - min(times)) / t * 100, 2), "mfu_793": round(flops * batch / t / PEAK, 3),
           "setup_and_first_step_s": round(first, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
           "loss": round(float(loss), 4)}
    if do_profile and cuda:
        row["profile"] = profile(step, sdpa)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=DEFAULT)
    ap.add_argument("--profile", nargs="*", default=["vit-base:256:blocks", "vit-base:256:whole"],
                    help="variants to profile too")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed window (3 windows, median kept)")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for spec in [*args.variants, *([args.one] if args.one else [])]:  # before any process starts
        unknown = set(spec.split("+")[1:]) - MODIFIERS
        if unknown:
            ap.error(f"{spec}: unknown modifier(s) {sorted(unknown)}; use {sorted(MODIFIERS)}")
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.steps, args.one in args.profile)), flush=True)
        return 0
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for spec in args.variants:
        cmd = [sys.executable, __file__, "--one", spec, "--steps", str(args.steps), "--profile", *args.profile]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in r.stdout.splitlines() if l.startswith("ROW ")]
        if r.returncode or not line:
            lines = [l for l in r.stderr.strip().splitlines() if "destroy_process_group" not in l] or ["?"]
            err = lines[-1][:200]
            print(f"{spec}: FAILED rc={r.returncode}:\n  " + "\n  ".join(lines[-12:]), flush=True)
            rows.append({"variant": spec, "error": err})
            continue
        rows.append(json.loads(line[0][4:]))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
        notes = [l for l in r.stdout.splitlines() if l.startswith("note:")]
        if notes:
            print("  " + "\n  ".join(notes), flush=True)
        if "profile" in rows[-1]:
            print(json.dumps(rows[-1]["profile"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"\n{'variant':28} {'img/s':>9} {'step ms':>8} {'mfu':>6} {'first s':>8} {'GiB':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:28} failed: {r['error'][:60]}")
        else:
            print(f"{r['variant']:28} {r['img_per_s']:9.0f} {r['step_ms']:8.2f} {r['mfu_793']:6.3f} "
                  f"{r['setup_and_first_step_s']:8.1f} {r['peak_gib']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

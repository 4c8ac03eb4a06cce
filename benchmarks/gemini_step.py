"""Where gemini's step goes on this host: forward + backward (FSDP2 streaming the blocks in and the
gradients out) against the CPU step (the gradient norm, then fused AdamW), per step, with a device sync
around each part. BENCHMARKS.md section 27.

    python benchmarks/gemini_step.py bf16            # ViT-B b128, as issue 10's gemini row
    python benchmarks/gemini_step.py fp16

Run it several times: on one host the same code spanned 792-1,184 img/s from process to process
(sections 27-28). One GPU already keeps the gathered params from forward to backward (parallel/plan.py).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import vitboost.engine as engine_mod
import vitboost.parallel.clip as clip_mod

times: dict[str, list[float]] = {"fwd_bwd": [], "step": [], "norm": [], "adamw": []}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(key, fn):
    def wrapper(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        times[key].append((time.perf_counter() - t0) * 1e3)
        return out
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("precision", choices=("bf16", "fp16"))
    p.add_argument("--model", default="vit-base")
    p.add_argument("-b", "--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    engine_mod.Engine.forward_backward = timed("fwd_bwd", engine_mod.Engine.forward_backward)
    engine_mod.Engine.step = timed("step", engine_mod.Engine.step)
    clip_mod.grad_norm = timed("norm", clip_mod.grad_norm)
    torch.optim.AdamW.step = timed("adamw", torch.optim.AdamW.step)
    from vitboost.cli import main as cli
    cli(["bench", "--plugin", "gemini", "--model", a.model, "-b", str(a.batch_size), "--num_labels", "3",
         "--steps", str(a.steps), "--warmup", "3", "--compile", "false", "--cuda_graph", "false",
         "--mixed_precision", a.precision])

    def median_ms(v: list[float]) -> float | None:
        v = sorted(v[3:])  # the warm-up steps left out
        return round(v[len(v) // 2], 1) if v else None
    print(json.dumps({"precision": a.precision, **{f"{k}_ms": median_ms(v) for k, v in times.items()}}))


if __name__ == "__main__":
    main()

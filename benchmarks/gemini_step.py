"""Gemini's step on this host: `vitboost bench --plugin gemini` at ViT-B b128 (issue 10's row).
--timers splits it: forward + backward (FSDP2 streaming the blocks in and the gradients out) against
the CPU step (fused AdamW; the gradient norm too before section 29 summed it on the GPU, where
--timers' norm is empty), with a device sync around each part; those syncs
stop the host from running ahead of the GPU, so a --timers run's img/s is not the step's.
--prefetch: each block's pre-forward also starts the next block's host-to-device copy
(FSDP2's set_modules_to_forward_prefetch; by default a copy starts only at its own block's pre-forward,
overlapping compute only as far as the host runs ahead): measured, no gain (section 29).
BENCHMARKS.md sections 27-29.

    python benchmarks/gemini_step.py bf16              # img/s as vitboost runs it
    python benchmarks/gemini_step.py bf16 --prefetch   # img/s with explicit forward prefetch
    python benchmarks/gemini_step.py fp16 --timers     # where the time goes
    python benchmarks/gemini_step.py bf16 --compile auto   # each block compiled, as `vitboost train` picks

Alternate the variants, several processes each: on one host the same code spanned 792-1,184 img/s
from process to process (sections 27-29). One GPU already keeps the gathered params from forward to
backward (parallel/plan.py).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import vitboost.engine as engine_mod
import vitboost.parallel.clip as clip_mod
import vitboost.parallel.parallelize as parallelize_mod
from vitboost.parallel.tensor import find_blocks

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
    p.add_argument("--timers", action="store_true", help="time forward + backward, the norm and AdamW (syncs)")
    p.add_argument("--prefetch", action="store_true", help="each block's forward starts the next one's copy")
    p.add_argument("--compile", default="false", help="vitboost's --compile (auto: what `vitboost train` picks)")
    p.add_argument("--model", default="vit-base")
    p.add_argument("-b", "--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    if a.timers:
        engine_mod.Engine.forward_backward = timed("fwd_bwd", engine_mod.Engine.forward_backward)
        engine_mod.Engine.step = timed("step", engine_mod.Engine.step)
        clip_mod.grad_norm = timed("norm", clip_mod.grad_norm)
        torch.optim.AdamW.step = timed("adamw", torch.optim.AdamW.step)
    if a.prefetch:
        apply = parallelize_mod.apply_fsdp

        def with_prefetch(model, mesh, **kw):
            model = apply(model, mesh, **kw)
            blocks = [b for _, b in find_blocks(model)]
            model.set_modules_to_forward_prefetch(blocks[:1])  # the root's pre-forward starts block 0's
            for block, nxt in zip(blocks, blocks[1:]):
                block.set_modules_to_forward_prefetch([nxt])
            return model
        parallelize_mod.apply_fsdp = with_prefetch
    from vitboost.cli import main as cli
    cli(["bench", "--plugin", "gemini", "--model", a.model, "-b", str(a.batch_size), "--num_labels", "3",
         "--steps", str(a.steps), "--warmup", "3", "--compile", a.compile, "--cuda_graph", "false",
         "--mixed_precision", a.precision])

    def median_ms(v: list[float]) -> float | None:
        v = sorted(v[3:])  # the warm-up steps left out
        return round(v[len(v) // 2], 1) if v else None
    if a.timers:
        print(json.dumps({"precision": a.precision, "prefetch": a.prefetch,
                          **{f"{k}_ms": median_ms(v) for k, v in times.items()}}))


if __name__ == "__main__":
    main()

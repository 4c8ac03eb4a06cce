"""Gemini's host-bound optimizer step on this CPU: the old norm + clip + AdamW path vs the fused one.

On ViT-B's parameter shapes (fp32 CPU tensors, ~86M params in ~200 tensors; the classifier has
1000 labels), with clipping active (max_norm below the gradient norm), times per part:

  before (bf16/fp32): norm (get_total_norm, as clip_grad_norm_ did), clip multiply, fused AdamW
  after  (bf16/fp32): norm on local shards (vitboost.parallel.clip.grad_norm), fused AdamW with
                      grad_scale = 1/clip_coef (the clip rides in the optimizer's one pass)
  before (fp16): GradScaler unscale (inf check + multiply), norm, clip multiply, for-loop AdamW
                 (fused was off: ShardedGradScaler's found_inf of shape [1] is rejected by it)
  after  (fp16): fused_clip_step with a LossScale: unscale, clip and the inf skip in fused AdamW

    python benchmarks/cpu_step.py [--threads N] [--iters 10] [--dtensor]

--dtensor wraps every tensor as a one-rank DTensor (Shard(0)), as gemini's FSDP2 grads are
(DTensor dispatch per tensor is part of the old path's cost). Gradients are restored between
iterations outside the timed parts. No GPU needed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vitboost


def vit_b_shapes(num_labels: int = 1000) -> list[torch.Size]:
    from transformers import ViTConfig, ViTForImageClassification
    with torch.device("meta"):
        model = ViTForImageClassification(ViTConfig(num_labels=num_labels))
    return [p.shape for p in model.parameters()]


def timed(fn, iters: int, reset) -> tuple[float, object]:
    out, times = None, []
    for i in range(iters + 2):  # two warm-ups: lazy AdamW states, allocator
        reset()
        t = time.perf_counter()
        out = fn()
        if i >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtensor", action="store_true", help="one-rank DTensors, as gemini's FSDP2 shards")
    ap.add_argument("--max_norm", type=float, default=1.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from torch.nn.utils import clip_grads_with_norm_, get_total_norm
    from vitboost.parallel.clip import LossScale, clip_coef, fused_clip_step, grad_norm

    torch.manual_seed(0)
    shapes = vit_b_shapes()
    wrap = lambda t: t  # noqa: E731
    if args.dtensor:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        wrap = lambda t: DTensor.from_local(t, mesh, [Shard(0)], run_check=False)  # noqa: E731
    masters = [torch.randn(s) * 0.02 for s in shapes]
    grad_src = [torch.randn(s) * 1e-3 for s in shapes]  # total norm ~9: clipping active at max_norm 1
    params = [torch.nn.Parameter(wrap(m.clone())) for m in masters]
    for p, g in zip(params, grad_src):
        p.grad = wrap(g.clone())
    n = sum(s.numel() for s in shapes)
    print(f"ViT-B shapes: {len(shapes)} tensors, {n / 1e6:.1f}M params; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads (of {os.cpu_count()} cpus){', one-rank DTensors' if args.dtensor else ''}")

    local = (lambda t: t.to_local()) if args.dtensor else (lambda t: t)  # noqa: E731

    def reset(scale: float = 1.0) -> None:
        with torch.no_grad():
            for p, g in zip(params, grad_src):
                local(p.grad).copy_(g).mul_(scale)

    grads = [p.grad for p in params]
    it, mx = args.iters, args.max_norm
    rows: list[tuple[str, float]] = []

    # ---- bf16/fp32, before: norm, clip multiply, fused AdamW
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    t_norm, total = timed(lambda: get_total_norm(grads), it, reset)
    if args.dtensor and isinstance(total, torch.distributed.tensor.DTensor):
        total = total.full_tensor()
    t_clip, _ = timed(lambda: clip_grads_with_norm_(params, mx, total), it, reset)
    t_adam, _ = timed(fused.step, it, reset)
    before = t_norm + t_clip + t_adam
    rows += [("before  norm (get_total_norm)", t_norm), ("before  clip multiply", t_clip),
             ("before  fused AdamW", t_adam), ("before  total", before)]

    # ---- bf16/fp32, after: local-shard norm, AdamW with grad_scale = 1/c
    t_norm2, total2 = timed(lambda: grad_norm(grads), it, reset)

    def adam_scaled():
        fused.grad_scale, fused.found_inf = 1.0 / clip_coef(total2, mx), None
        fused.step()
        del fused.grad_scale, fused.found_inf
    t_adam2, _ = timed(adam_scaled, it, reset)
    t_after, _ = timed(lambda: fused_clip_step(fused, params, mx), it, reset)
    rows += [("after   norm (local shards)", t_norm2), ("after   fused AdamW + grad_scale", t_adam2),
             ("after   total (fused_clip_step)", t_after)]
    assert torch.allclose(total, total2, rtol=1e-5), (total, total2)

    # ---- fp16, before: GradScaler unscale, norm, clip, for-loop AdamW
    S = 2.0 ** 16
    loop = torch.optim.AdamW(params, lr=1e-4)  # what ShardedGradScaler left: no fused, no foreach on CPU

    def unscale():
        found = torch.zeros(())
        inv = torch.full((), 1.0 / S)
        torch._amp_foreach_non_finite_check_and_unscale_([local(g) for g in grads], found, inv)
        return found
    t_unscale, _ = timed(unscale, it, lambda: reset(S))
    t_loop, _ = timed(loop.step, it, reset)
    fp16_before = t_unscale + t_norm + t_clip + t_loop
    rows += [("fp16 before  unscale (inf check + mul)", t_unscale), ("fp16 before  for-loop AdamW", t_loop),
             ("fp16 before  total (+ norm + clip above)", fp16_before)]

    # ---- fp16, after: fused_clip_step with a LossScale (norm of the scaled grads, all in fused AdamW)
    ls = LossScale(init_scale=S, growth_interval=10 ** 9)
    t_fp16, _ = timed(lambda: fused_clip_step(fused, params, mx, loss_scale=ls), it, lambda: reset(S))
    rows += [("fp16 after   total (fused_clip_step)", t_fp16)]

    w = max(len(r) for r, _ in rows)
    for name, ms in rows:
        print(f"  {name:<{w}}  {ms:8.1f} ms")
    print(f"bf16/fp32 step: {before:.1f} -> {t_after:.1f} ms ({before / t_after:.2f}x); "
          f"norm {t_norm / t_norm2:.2f}x faster; fp16 step: {fp16_before:.1f} -> {t_fp16:.1f} ms "
          f"({fp16_before / t_fp16:.2f}x)")


if __name__ == "__main__":
    main()

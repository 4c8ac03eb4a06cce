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
iterations outside the timed parts; each part reports the fastest of --iters runs. No GPU needed.
"""
from __future__ import annotations

import argparse
import os
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


class Timer:
    """Fastest of the timed calls per part: the variants run interleaved, iteration by
    iteration, so background load on a shared CPU hits them alike (and noise only adds time)."""

    def __init__(self):
        self.ms: dict[str, list[float]] = {}
        self.record = False

    def __call__(self, name: str, fn):
        t = time.perf_counter()
        out = fn()
        if self.record:
            self.ms.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
        return out

    def best(self, name: str) -> float:
        return min(self.ms[name])


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
    mx, S = args.max_norm, 2.0 ** 16
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    loop = torch.optim.AdamW(params, lr=1e-4)  # what ShardedGradScaler left for fp16: no fused, no foreach on CPU
    ls = LossScale(init_scale=S, growth_interval=10 ** 9)
    T = Timer()
    exact = sum(g.double().square().sum().item() for g in grad_src) ** 0.5  # the fp64 norm
    errs: dict[str, float] = {}

    def full(t):
        return t.full_tensor() if args.dtensor and hasattr(t, "full_tensor") else t

    def one_iteration():
        # bf16/fp32 before: norm, clip multiply, fused AdamW
        reset()
        total = full(T("b.norm", lambda: get_total_norm(grads)))
        T("b.clip", lambda: clip_grads_with_norm_(params, mx, total))
        T("b.adam", fused.step)
        # after: local-shard norm, then AdamW with grad_scale = 1/c (the parts, then the whole)
        reset()
        total2 = T("a.norm", lambda: grad_norm(grads))
        fused.grad_scale, fused.found_inf = 1.0 / clip_coef(total2, mx), None
        T("a.adam", fused.step)
        del fused.grad_scale, fused.found_inf
        errs['before'], errs['after'] = (abs(t.item() / exact - 1) for t in (total, total2))
        reset()
        T("a.total", lambda: fused_clip_step(fused, params, mx))
        # fp16 before: GradScaler's unscale (inf check + multiply), norm, clip, for-loop AdamW
        reset(S)

        def unscale():
            found = torch.zeros(())
            torch._amp_foreach_non_finite_check_and_unscale_([local(g) for g in grads], found,
                                                             torch.full((), 1.0 / S))
            return found
        T("h.unscale", unscale)
        total = full(T("h.norm", lambda: get_total_norm(grads)))
        T("h.clip", lambda: clip_grads_with_norm_(params, mx, total))
        T("h.adam", loop.step)
        # fp16 after: fused_clip_step with a LossScale (norm of the scaled grads; all in fused AdamW)
        reset(S)
        T("f.total", lambda: fused_clip_step(fused, params, mx, loss_scale=ls))

    for i in range(args.iters + 1):  # the first: warm-up (lazy AdamW states, allocator)
        T.record = i > 0
        one_iteration()

    b = T.best
    before = b("b.norm") + b("b.clip") + b("b.adam")
    fp16_before = b("h.unscale") + b("h.norm") + b("h.clip") + b("h.adam")
    rows = [("before  norm (get_total_norm)", b("b.norm")), ("before  clip multiply", b("b.clip")),
            ("before  fused AdamW", b("b.adam")), ("before  total", before),
            ("after   norm (local shards)", b("a.norm")), ("after   fused AdamW + grad_scale", b("a.adam")),
            ("after   total (fused_clip_step)", b("a.total")),
            ("fp16 before  unscale (inf check + mul)", b("h.unscale")), ("fp16 before  norm", b("h.norm")),
            ("fp16 before  clip multiply", b("h.clip")), ("fp16 before  for-loop AdamW", b("h.adam")),
            ("fp16 before  total", fp16_before), ("fp16 after   total (fused_clip_step)", b("f.total"))]
    t_after, t_fp16, t_norm, t_norm2 = b("a.total"), b("f.total"), b("b.norm"), b("a.norm")
    w = max(len(r) for r, _ in rows)
    for name, ms in rows:
        print(f"  {name:<{w}}  {ms:8.1f} ms")
    print(f"bf16/fp32 step: {before:.1f} -> {t_after:.1f} ms ({before / t_after:.2f}x); "
          f"norm {t_norm / t_norm2:.2f}x faster; fp16 step: {fp16_before:.1f} -> {t_fp16:.1f} ms "
          f"({fp16_before / t_fp16:.2f}x)")
    print(f"norm relative error vs fp64: before {errs['before']:.1e}, after {errs['after']:.1e}")


if __name__ == "__main__":
    main()

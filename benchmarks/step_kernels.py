"""Where a training step's GPU time goes, by kernel family; and SDPA's backends at ViT's shapes.

    python benchmarks/step_kernels.py sdpa     # forward+backward per backend, (256,12,197,64) and smaller
    python benchmarks/step_kernels.py eval     # forward only, no grad: which backend the default picks
    python benchmarks/step_kernels.py bench default 1 -- bench --model vit-base -b 256 --compile blocks \
        --cuda_graph false --steps 20 --warmup 5 --num_labels 3      # the step, then a kernel table

`bench BACKEND 1`: `vitboost bench` as given, then 3 more steps under torch.profiler: the step's CUDA
time split into GEMM / attention / Triton (Inductor's fused elementwise and norms) / AdamW / other,
and the 45 costliest kernels. BACKEND other than default restricts SDPA's backends before the model
compiles; Inductor's FX-graph cache ignores that setting, so give each backend its own
TORCHINDUCTOR_CACHE_DIR (BENCHMARKS.md section 23).
"""
import sys, json
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAMES = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION}


def sdpa_bench():
    for b, h, s, d in [(256, 12, 197, 64), (128, 6, 101, 64), (16, 12, 197, 64)]:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
                   for _ in range(3))
        g = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        flops = 4 * b * h * s * s * d * 3.5  # fwd + bwd (2.5x)
        for name, be in NAMES.items():
            try:
                with sdpa_kernel([be]):
                    for _ in range(5):
                        F.scaled_dot_product_attention(q, k, v).backward(g)
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(20):
                        F.scaled_dot_product_attention(q, k, v).backward(g)
                    e1.record(); torch.cuda.synchronize()
                    ms = e0.elapsed_time(e1) / 20
                    f0, f1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    with torch.no_grad():
                        f0.record()
                        for _ in range(20):
                            F.scaled_dot_product_attention(q, k, v)
                        f1.record(); torch.cuda.synchronize()
                    fms = f0.elapsed_time(f1) / 20
                print(json.dumps({"shape": [b, h, s, d], "backend": name, "fwd_bwd_ms": round(ms, 3),
                                  "fwd_ms": round(fms, 3), "tflops": round(flops / ms / 1e9, 1),
                                  "x12_layers_ms": round(ms * 12, 2)}), flush=True)
            except Exception as e:
                print(json.dumps({"shape": [b, h, s, d], "backend": name, "error": str(e)[:200]}), flush=True)


def bench(backend, prof, args):
    if backend != "default":
        for n in NAMES:
            getattr(torch.backends.cuda, f"enable_{'mem_efficient' if n == 'efficient' else n}_sdp")(n == backend)
    import vitboost.bench as B
    orig = B.time_steps

    def timed(step, steps, warmup, *a, **k):
        r = orig(step, steps, warmup, *a, **k)
        if prof == "1":
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            ev = [e for e in p.key_averages() if e.device_time_total > 0]
            tot = sum(e.device_time_total for e in ev) / 3 / 1e3
            cats = {}
            for e in ev:
                n = e.key.lower()
                c = ("attention" if any(x in n for x in ("flash", "fmha", "cudnn", "attention", "sdpa")) else
                     "gemm" if any(x in n for x in ("gemm", "nvjet", "xmma", "cutlass", "sm90")) else
                     "triton" if "triton" in n else "adam" if "adam" in n else "other")
                cats[c] = cats.get(c, 0) + e.device_time_total / 3 / 1e3
            print("KERNELS", json.dumps({"total_ms": round(tot, 2), **{k: round(v, 2) for k, v in cats.items()}}))
            for e in sorted(ev, key=lambda e: -e.device_time_total)[:45]:
                print(f"K {e.device_time_total/3/1e3:8.3f} ms  x{e.count//3:4d}  {e.key[:150]}")
        return r
    B.time_steps = timed
    from vitboost.cli import main
    return main(args)


def eval_bench():
    from torch.profiler import profile, ProfilerActivity
    for b, h, s, d in [(256, 12, 197, 64), (128, 3, 101, 64), (16, 12, 197, 64)]:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        for name in ["default", *NAMES]:
            ctx = sdpa_kernel([NAMES[name]]) if name != "default" else torch.no_grad()
            try:
                with ctx, torch.no_grad():
                    for _ in range(3):
                        F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(20):
                        F.scaled_dot_product_attention(q, k, v)
                    e1.record(); torch.cuda.synchronize()
                    kern = ""
                    if name == "default":
                        with profile(activities=[ProfilerActivity.CUDA]) as p:
                            F.scaled_dot_product_attention(q, k, v); torch.cuda.synchronize()
                        kern = [e.key[:60] for e in p.key_averages() if e.device_time_total > 0][:2]
                print(json.dumps({"eval_shape": [b, h, s, d], "backend": name, "ms": round(e0.elapsed_time(e1) / 20, 3),
                                  "kernel": kern}), flush=True)
            except Exception as e:
                print(json.dumps({"eval_shape": [b, h, s, d], "backend": name, "error": str(e)[:200]}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "eval":
        eval_bench()
    elif sys.argv[1] == "sdpa":
        sdpa_bench()
    else:
        sys.exit(bench(sys.argv[2], sys.argv[3], sys.argv[5:]))

"""GPU check: the fast step (compiled and/or one CUDA graph, as `vitboost train` picks it) gives
the eager step's losses within bf16 noise, under every plugin that runs on one GPU.

    python benchmarks/step_parity.py --json results/step_parity.json
    python benchmarks/step_parity.py --plugins torch_ddp_fp16 --init_scale 1024   # fp16, no step overflowing

Per plugin: the same init and the same 50 batches (4 fixed random batches, cycled, so the loss
falls), trained once with --compile false --cuda_graph false and once with the defaults a long
run gets. Reported: what the fast run used, the largest relative loss difference over the steps,
the final losses, and pass/fail against --tol. Under fp16 also the steps each run skipped: at
GradScaler's 2**16, eager's fp16 kernels overflow on steps that the compiled ones (fp32 inside fused
kernels) do not, and the runs part like two seeds; --init_scale low enough that neither overflows
compares the arithmetic (BENCHMARKS.md section 35).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLUGINS = [("torch_ddp", {}), ("torch_ddp_fp16", {}), ("low_level_zero", {"zero_stage": 1}),
           ("low_level_zero", {"zero_stage": 2}), ("fsdp", {}), ("hybrid_parallel", {}), ("gemini", {})]


def losses(plugin: str, extra: dict, fast: bool, model: str, batch: int, steps: int,
           fast_flags: dict | None = None, init_scale: float = 2.0 ** 16) -> tuple[list[float], list[float], str]:
    import torch
    from vitboost.augment import soft_cross_entropy
    from vitboost.config import make_config
    from vitboost.engine import Engine
    from vitboost.model import build_model
    from vitboost.parallel.dims import ParallelDims
    from vitboost.parallel.plan import make_plan, plan_step
    from vitboost.train import init_device

    device = torch.device("cuda", 0)
    speed = (fast_flags or {}) if fast else {"compile": "false", "cuda_graph": "false"}
    cfg = make_config({"model": model, "pretrained": "none", "batch_size": batch, "plugin": plugin, "lr": 1e-4,
                       **extra, **speed})
    dims = ParallelDims(1)
    dims.build_mesh("cuda")
    torch.manual_seed(0)
    net, _ = build_model(model, [str(i) for i in range(10)], pretrained="none", log=lambda *a: None,
                         device=init_device(device, plugin))
    plan = plan_step(make_plan(cfg, "cuda", 1), cfg, "cuda", 10_000)
    engine = Engine(net, cfg, dims, plan, device, soft_cross_entropy)
    if engine.scaler is not None:
        engine.scaler.load_state_dict({**engine.scaler.state_dict(), "scale": init_scale})
    g = torch.Generator(device="cpu").manual_seed(1)
    data = [(torch.randn(batch, 3, 224, 224, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
            for _ in range(4)]
    out, scales = [], []
    for i in range(steps):
        loss, _ = engine.train_step([data[i % 4]])
        out.append(float(loss))
        if engine.scaler is not None:  # fp16: a skipped step (inf grads) halves the loss scale
            scales.append(float(engine.scaler._scale))
    what = f"compile={plan.compile} cuda_graph={plan.cuda_graph} {plan.precision} dp_wrapper={plan.data_parallel}"
    del engine, net
    torch.cuda.empty_cache()
    return out, scales, what


def _skipped(scales: list[float], init: float = 2.0 ** 16) -> list[int]:
    """Steps whose update was skipped: the loss scale fell below the one before (GradScaler backoff)."""
    before = [init] + scales[:-1]
    return [i for i, (s, b) in enumerate(zip(scales, before)) if s < b]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit-tiny")
    p.add_argument("-b", "--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tol", type=float, default=2e-2, help="max relative loss difference at any step")
    p.add_argument("--json", default="results/step_parity.json")
    p.add_argument("--plugins", nargs="*", help="only these (names as in the table, e.g. torch_ddp_fp16)")
    p.add_argument("--fast", default="", help="the fast run's flags instead of a long run's defaults, "
                   "e.g. compile=false,cuda_graph=true")
    p.add_argument("--init_scale", type=float, default=2.0 ** 16,
                   help="fp16's first loss scale (GradScaler's 2**16 by default). One low enough that neither run "
                   "overflows compares the two steps' arithmetic, not which steps each skipped")
    a = p.parse_args()
    from vitboost.parallel.dims import init_distributed
    init_distributed("cuda")
    rows = []
    fast_flags = dict(kv.split("=") for kv in a.fast.split(",") if kv)
    for plugin, extra in PLUGINS:
        name = plugin + (f" zero{extra['zero_stage']}" if extra else "")
        if a.plugins and name not in a.plugins and plugin not in a.plugins:
            continue
        try:
            ref, ref_scales, _ = losses(plugin, extra, False, a.model, a.batch_size, a.steps, None, a.init_scale)
            fast, fast_scales, what = losses(plugin, extra, True, a.model, a.batch_size, a.steps, fast_flags,
                                             a.init_scale)
        except Exception as e:
            rows.append({"plugin": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            print(rows[-1], flush=True)
            continue
        rel = max(abs(x - y) / abs(y) for x, y in zip(fast, ref))
        rows.append({"plugin": name, "fast": what, "max_rel_diff": round(rel, 5), "first_loss": round(ref[0], 4),
                     "final_eager": round(ref[-1], 4), "final_fast": round(fast[-1], 4), "pass": rel < a.tol,
                     "eager": [round(x, 5) for x in ref], "fast_losses": [round(x, 5) for x in fast]})
        if ref_scales:  # the steps where either run skipped an update (its loss scale fell)
            rows[-1]["init_scale"] = a.init_scale
            rows[-1]["skipped_eager"] = _skipped(ref_scales, a.init_scale)
            rows[-1]["skipped_fast"] = _skipped(fast_scales, a.init_scale)
            rows[-1]["first_diverged"] = next((i for i, (x, y) in enumerate(zip(fast, ref))
                                               if abs(x - y) / abs(y) > 1e-3), None)
        print({k: v for k, v in rows[-1].items() if k not in ("eager", "fast_losses")}, flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"| plugin | fast step | max rel. loss diff ({a.steps} steps) | final loss eager / fast | pass |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['plugin']} | error: {r['error']} | | | no |")
        else:
            print(f"| {r['plugin']} | {r['fast']} | {r['max_rel_diff']} | {r['final_eager']} / {r['final_fast']} | "
                  f"{'yes' if r['pass'] else 'no'} |")


if __name__ == "__main__":
    main()

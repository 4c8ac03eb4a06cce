"""ColossalAI's ViT benchmark step, on this host, for ratios measured in one run beside `vitboost bench`.

The step is the one ColossalAI's example times (examples/images/vit/vit_benchmark.py, 0.5.0): HF
ViTForImageClassification (ViT-B/16, 224 px, random init), a fresh random batch on the GPU each step,
`booster.backward`, HybridAdam, a device sync after every step. The plugins are built with the example's
arguments: gemini `GeminiPlugin(offload_optim_frac=1.0, pin_memory=True, initial_scale=2**5)` (fp16 by
default, as the example; `--precision bf16` too), low_level_zero `LowLevelZeroPlugin(initial_scale=2**5)`,
torch_ddp and torch_ddp_fp16 `TorchDDPPlugin()` (the latter with the booster's fp16 mixed precision).

    python benchmarks/colossalai_peer.py --plugin gemini --batch_size 128 --json peers.jsonl
    torchrun --nproc_per_node 2 benchmarks/colossalai_peer.py --plugin torch_ddp_fp16   # per-GPU batch, as theirs

Run on one GPU so far (BENCHMARKS.md section 34); several ranks are written for, not yet measured.

ColossalAI must be importable. With no network (the GPU machines here), its sdist from PyPI unpacked on
PYTHONPATH works with the image's torch and transformers: `pip download --no-deps colossalai==0.5.0
galore-torch` where pip works, carry both, and put stand-ins for bitsandbytes' Optimizer2State on the
path (0.5.0 imports it for GaLore, which this step never builds); results/session19/scripts/ has the
call that does this. HybridAdam's CUDA and CPU kernels are built on first use (nvcc, g++); the build
is left out of the timing and, to save minutes, targets only the GPU in the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plugin", default="gemini", choices=["torch_ddp", "torch_ddp_fp16", "low_level_zero", "gemini"])
    ap.add_argument("--precision", choices=["fp16", "bf16"], help="gemini / low_level_zero only (default fp16)")
    ap.add_argument("--batch_size", type=int, default=128)
    ap.add_argument("--num_labels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--json", help="append the row here (JSON lines)")
    args = ap.parse_args()
    if args.precision and args.plugin.startswith("torch_ddp"):
        ap.error(f"--precision is for gemini / low_level_zero; {args.plugin} is "
                 f"{'fp16' if args.plugin == 'torch_ddp_fp16' else 'fp32'} by its name")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571"}.items():
        os.environ.setdefault(k, v)  # one process without torchrun

    import torch
    import transformers
    import colossalai
    from colossalai.booster import Booster
    from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin
    from colossalai.nn.optimizer import HybridAdam
    from transformers import ViTConfig, ViTForImageClassification

    t0 = time.perf_counter()
    colossalai.launch_from_torch(seed=42)
    own_arch = "sm_%d%d" % torch.cuda.get_device_capability()
    torch.cuda.get_arch_list = lambda: [own_arch]  # the kernels' JIT build: this GPU's arch only
    precision = args.precision or "fp16"
    booster_kwargs = {}
    if args.plugin == "torch_ddp_fp16":
        booster_kwargs["mixed_precision"] = "fp16"
    if args.plugin.startswith("torch_ddp"):
        plugin = TorchDDPPlugin()
        precision = "fp16" if args.plugin == "torch_ddp_fp16" else "fp32"
    elif args.plugin == "gemini":
        plugin = GeminiPlugin(offload_optim_frac=1.0, pin_memory=True, initial_scale=2**5, precision=precision)
    else:
        plugin = LowLevelZeroPlugin(initial_scale=2**5, precision=precision)
    model = ViTForImageClassification(ViTConfig(num_labels=args.num_labels))  # ViT-B/16 224
    optimizer = HybridAdam(model.parameters(), lr=5e-5)
    booster = Booster(plugin=plugin, **booster_kwargs)
    model, optimizer, _, _, _ = booster.boost(model, optimizer)
    model.train()
    setup = time.perf_counter() - t0
    device = torch.cuda.current_device()

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        x = torch.randn(args.batch_size, 3, 224, 224, device=device)
        y = torch.randint(0, args.num_labels, (args.batch_size,), device=device)
        loss = model(pixel_values=x, labels=y).loss
        booster.backward(loss, optimizer)
        optimizer.step()
        torch.cuda.synchronize()  # as the example's loop
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    world = int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) != 0:
        return 0
    row = {"name": f"colossalai_{args.plugin}", "plugin": args.plugin, "precision": precision, "world_size": world,
           "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
           "img_per_s": round(world * args.batch_size * args.steps / elapsed, 1),
           "img_per_s_per_gpu": round(args.batch_size * args.steps / elapsed, 1),
           "step_time_ms": round(elapsed / args.steps * 1e3, 2), "setup_s": round(setup, 1),
           "warmup_s": round(warm, 2), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "loss": round(float(loss), 4), "device": torch.cuda.get_device_name(), "colossalai": colossalai.__version__,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    line = json.dumps(row)
    print("ROW " + line, flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ViT training step in bf16 against torchao's float8 training (tensorwise or rowwise scaling), each
block compiled, one GPU (Hopper or newer). One JSON line per call; run each mode in its own process:

    pip install --no-deps torchao            # not a vitboost dependency
    python benchmarks/float8_step.py bf16 256
    python benchmarks/float8_step.py fp8 256
    python benchmarks/float8_step.py fp8_rowwise 256 [vit-base]

Every linear in the blocks becomes torchao's Float8Linear (the patch embedding and the 3-class head,
whose sizes float8 GEMMs do not take, stay bf16). BENCHMARKS.md section 24: slower than bf16 at ViT-B
batch 256 on an H200, so vitboost has no fp8 option.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from vitboost.augment import soft_cross_entropy
from vitboost.config import TrainConfig
from vitboost.engine import Engine
from vitboost.model import build_model
from vitboost.parallel.dims import ParallelDims, init_distributed
from vitboost.parallel.plan import make_plan, plan_step


def main(mode: str, batch: int, model_name: str = "vit-base") -> dict:
    dev = torch.device("cuda", 0)
    init_distributed("cuda")
    cfg = TrainConfig(model=model_name, batch_size=batch, compile="blocks", cuda_graph="false")
    dims = ParallelDims(1)
    dims.build_mesh("cuda")
    torch.manual_seed(0)
    model, _ = build_model(model_name, ["a", "b", "c"], pretrained="none", log=lambda *a: None, device=dev)
    if mode.startswith("fp8"):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        config = Float8LinearConfig.from_recipe_name("rowwise") if mode == "fp8_rowwise" else Float8LinearConfig()
        convert_to_float8_training(model, config=config,
                                   module_filter_fn=lambda mod, fqn: "classifier" not in fqn and "patch" not in fqn)
    plan = dataclasses.replace(plan_step(make_plan(cfg, "cuda", 1), cfg, "cuda", 10_000), compile="blocks",
                               cuda_graph=False)
    engine = Engine(model, cfg, dims, plan, dev, soft_cross_entropy)
    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.softmax(torch.randn(batch, 3, device=dev), -1)
    t = time.perf_counter()
    losses = [engine.train_step([(x, y)])[0] for _ in range(5)]  # warm-up: the compile
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    losses += [engine.train_step([(x, y)])[0] for _ in range(20)]
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 20
    return {"mode": mode, "model": model_name, "batch": batch, "warmup_s": round(first, 1), "ms": round(ms, 2),
            "img_s": round(batch / ms * 1e3), "loss_first_last": [round(float(losses[0]), 4), round(float(losses[-1]), 4)]}


if __name__ == "__main__":
    mode, batch, *rest = sys.argv[1:]
    print(json.dumps(main(mode, int(batch), *rest[:1])), flush=True)

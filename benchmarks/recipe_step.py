"""The from-scratch recipe's training step alone, per compile mode: one CUDA-graphed step (bf16, EMA,
drop-path, soft targets) on a fixed batch, so the number is GPU time, and the seconds the first
steps take (the compile, when there is one). Each call is one process; a fresh
TORCHINDUCTOR_CACHE_DIR makes its compile cold, a second call with the same one warm.

    python benchmarks/recipe_step.py none 128                 # vit-tiny@160, batch 128, no compile
    python benchmarks/recipe_step.py model 128                # the whole model compiled
    python benchmarks/recipe_step.py blocks 128 vit-small 160 # each block compiled

Prints one JSON line (BENCHMARKS.md sections 20-21).
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
from vitboost.regularize import apply_drop_path


def main(mode: str, batch: int, model_name: str = "vit-tiny", size: int = 160) -> dict:
    dev = torch.device("cuda", 0)
    init_distributed("cuda")
    cfg = TrainConfig(model=model_name, image_size=size, batch_size=batch, ema=0.999, drop_path=0.05,
                      compile="false", cuda_graph="true")
    dims = ParallelDims(1)
    dims.build_mesh("cuda")
    torch.manual_seed(0)
    model, _ = build_model(model_name, ["a", "b", "c"], pretrained="none", image_size=size, log=lambda *a: None,
                           device=dev)
    apply_drop_path(model, cfg.drop_path)
    plan = dataclasses.replace(plan_step(make_plan(cfg, "cuda", 1), cfg, "cuda", 10_000), compile=mode)
    engine = Engine(model, cfg, dims, plan, dev, soft_cross_entropy)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.softmax(torch.randn(batch, 3, device=dev), -1)
    t = time.perf_counter()
    for _ in range(4):  # warm-up, capture (and the compile)
        engine.train_step([(x, y)])
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(100):
        engine.train_step([(x, y)])
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 100 * 1e3
    from torch._dynamo.utils import counters
    return {"model": model_name, "size": size, "batch": batch, "compile": mode, "first4_s": round(first, 1),
            "ms_per_step": round(ms, 2), "img_s": round(batch / ms * 1e3),
            "graphs": counters["stats"]["unique_graphs"]}  # compiled graphs: 1 when every block shares one


if __name__ == "__main__":
    mode, batch, *rest = sys.argv[1:]
    print(json.dumps(main(mode, int(batch), *rest[:1], *map(int, rest[1:2]))), flush=True)

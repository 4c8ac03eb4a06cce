"""The recipe's teacher phase beside the student's compile thread, one GPU: how much does the thread
slow the teacher, and does a shorter GIL switch interval give it back? One variant per process, each
with a fresh Inductor cache (so the compile is cold, as on a machine's first run):

    python benchmarks/teacher_beside_compile.py alone          # the teacher alone (then the compile alone)
    python benchmarks/teacher_beside_compile.py beside         # what vitboost does (compile_ahead.py)
    python benchmarks/teacher_beside_compile.py beside 0.0001  # the same with sys.setswitchinterval(1e-4)

The teacher (resnet-small, 100 epochs of 1,034 images at 160 px, its step one CUDA graph) is GPU-bound,
yet beside the thread it took 6.2-7.6 s instead of 3.7 (BENCHMARKS.md sections 23-24). The guess, not
measured yet: Python's 5 ms GIL switch interval leaves the GPU idle while the teacher's thread waits to
launch its next graph. Prints one JSON line: teacher seconds, the thread's seconds, seconds waited after.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # cold, before torch loads

import torch  # noqa: E402

from vitboost import distill  # noqa: E402
from vitboost.compile_ahead import CompileAhead  # noqa: E402
from vitboost.config import TrainConfig  # noqa: E402
from vitboost.data import ImageSplit  # noqa: E402
from vitboost.model import build_model  # noqa: E402
from vitboost.parallel.tensor import find_blocks  # noqa: E402
from vitboost.regularize import apply_drop_path  # noqa: E402


def main(variant: str, switch_interval: float | None = None) -> dict:
    dev = torch.device("cuda")
    model, _ = build_model("vit-tiny", ["a", "b", "c"], pretrained="none", image_size=160, log=lambda *a: None,
                           device=dev)
    apply_drop_path(model, 0.05)
    for _, block in find_blocks(model):
        block.compile()
    split = ImageSplit(torch.randint(0, 255, (1034, 3, 160, 160), dtype=torch.uint8, device=dev),
                       torch.randint(0, 3, (1034,), device=dev))
    cfg = TrainConfig(batch_size=128, teacher_epochs=100, seed=42)
    ahead = CompileAhead(model, torch.zeros(128, 3, 160, 160, device=dev),
                         lambda: torch.autocast("cuda", torch.bfloat16))
    teacher = distill._named("resnet-small", 3, dev, 42)
    default = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    t0 = time.perf_counter()
    distill._train(teacher, split, 3, [0.5] * 3, [0.5] * 3, cfg, dev,
                   beside=ahead.start if variant == "beside" else None)
    torch.cuda.synchronize()
    teacher_s = time.perf_counter() - t0
    if variant == "alone":
        ahead.start()
    waited = ahead.join()
    sys.setswitchinterval(default)
    return {"variant": variant, "switch_interval": switch_interval or default, "teacher_s": round(teacher_s, 2),
            "thread_s": round(ahead.seconds, 2), "waited_s": round(waited, 2),
            "teacher_plus_waited_s": round(teacher_s + waited, 2)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else None)), flush=True)

"""Does starting CUDA in a thread overlap with the transformers import (what `vitboost train` does)?
One fresh process per way: ``seq`` imports transformers' ViT code, then starts CUDA; ``thread`` starts
CUDA first in the CLI's thread (``vitboost.cli._start_cuda``). Prints the seconds of each part and the total.

    for i in 1 2; do python benchmarks/cuda_start.py seq; python benchmarks/cuda_start.py thread; done

BENCHMARKS.md section 22. Run it with Python's bytecode cached, or every process compiles every module.
"""
import sys
import time

t0 = time.perf_counter()
import torch  # noqa: E402

t1 = time.perf_counter()
way = sys.argv[1] if len(sys.argv) > 1 else "seq"
thread = None
if way == "thread":
    from vitboost.cli import _start_cuda  # what `vitboost train` runs
    thread = _start_cuda()
from vitboost.model import import_transformers_lean  # noqa: E402

import_transformers_lean()
t2 = time.perf_counter()
if thread is not None:
    thread.join()
else:
    torch.cuda.init()
    torch.empty(1, device="cuda")
t3 = time.perf_counter()
print(way, f"torch {t1 - t0:.2f} transformers {t2 - t1:.2f} cuda(after) {t3 - t2:.2f} total {t3 - t0:.2f}")

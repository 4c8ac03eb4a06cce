"""DCP's checkpoint write time by writer threads, for a state the size of ViT-B's (model + AdamW's two
moments: 3 x 86M fp32 = 1.03 GB in 450 tensors), on the CPU, fsync included (DCP's file writer syncs).
vitboost.checkpoint.WRITE_THREADS comes from this (BENCHMARKS.md section 29).

    python benchmarks/checkpoint_write.py [--params 86000000] [--dir /tmp/ckpt_bench] [--threads 1 4 8]
"""
from __future__ import annotations

import argparse
import shutil
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=86_000_000)
    p.add_argument("--dir", default="/tmp/ckpt_bench", help="where to write (removed afterwards)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    state = {f"{k}.{i}": torch.randn(a.params // 150) for k in ("model", "exp_avg", "exp_avg_sq") for i in range(150)}
    try:
        for _ in range(a.repeats):  # alternating: the first round also warms the page cache and allocator
            for n in a.threads:
                path = f"{a.dir}/threads_{n}"
                shutil.rmtree(path, ignore_errors=True)
                t0 = time.perf_counter()
                dcp.save(state, checkpoint_id=path, storage_writer=FileSystemWriter(path, thread_count=n), no_dist=True)
                print(f"thread_count={n}: {time.perf_counter() - t0:.2f} s", flush=True)
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

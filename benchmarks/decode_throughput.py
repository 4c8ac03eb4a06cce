"""Decode + resize throughput of the dataset cache build, per core (images/s).

Why: the cached path decodes every image once; this says how long that takes for a dataset
of a given size, and what a streaming loader would need per core to keep a GPU fed.

    python benchmarks/decode_throughput.py [--source data/beans] [--size 224] [--cores 1 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

from vitboost.data import load_image_dataset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="data/beans")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--cores", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    all_cores = os.sched_getaffinity(0)
    print(f"{'cores':>5} {'images':>7} {'best s':>7} {'img/s':>8} {'img/s/core':>10}")
    for cores in args.cores:
        os.sched_setaffinity(0, sorted(all_cores)[:cores])  # the decode pool sizes itself from this
        torch.set_num_threads(cores)  # no OpenMP spinning on cores we do not have
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            ds = load_image_dataset(args.source, args.size, cache_dir=None, log=lambda *_: None)
            best = min(best, time.perf_counter() - t)
        n = sum(len(s) for s in ds.splits.values())
        print(f"{cores:>5} {n:>7} {best:>7.2f} {n / best:>8.0f} {n / best / cores:>10.0f}")
    os.sched_setaffinity(0, all_cores)


if __name__ == "__main__":
    main()

"""How fast a machine reads torch's and NVIDIA's shared libraries the first time: one reader against many.

    python benchmarks/cold_read.py [THREADS]

The libraries (the set benchmarks/page_cache.py counts) are split into two halves of about equal size,
whole files each. The first half is read by one thread, file after file, as a process that faults its
libraries in does; the second by THREADS threads (default 16) taking 8 MB ranges from a shared queue.
The Python files of the packages a run imports (torch, transformers, ...: thousands of small files) are
split the same way, every other file. Both halves are cold on a freshly started machine, so the two
rates compare one reader with many on the same storage. Run it first on a fresh machine
(benchmarks/page_cache.py says whether they were cold); a second run reads the page cache. Prints one
JSON line.
"""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from page_cache import library_files, resident  # noqa: E402

CHUNK = 8 << 20


def read_ranges(ranges: "queue.Queue[tuple[Path, int]]") -> None:
    buf = bytearray(CHUNK)
    while True:
        try:
            path, offset = ranges.get_nowait()
        except queue.Empty:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.preadv(fd, [buf], offset)
        finally:
            os.close(fd)


def timed_read(files: list[Path], threads: int) -> dict:
    ranges: queue.Queue = queue.Queue()
    for f in files:  # in file order, so one thread reads each file front to back
        for offset in range(0, f.stat().st_size, CHUNK):
            ranges.put((f, offset))
    size = sum(f.stat().st_size for f in files)
    cached = sum(r[1] for r in resident(files))
    t0 = time.perf_counter()
    workers = [threading.Thread(target=read_ranges, args=(ranges,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    s = time.perf_counter() - t0
    return {"threads": threads, "files": len(files), "gb": round(size / 1e9, 3),
            "gb_cached_before": round(cached / 1e9, 3), "seconds": round(s, 2), "gb_per_s": round(size / 1e9 / s, 3)}


PACKAGES = ("torch", "transformers", "triton", "sympy", "safetensors", "huggingface_hub", "numpy", "PIL", "tqdm")


def python_files() -> list[Path]:
    files = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)  # found, not imported
        if spec and spec.origin:
            files += sorted(p for p in Path(spec.origin).parent.rglob("*.py*") if p.suffix in (".py", ".pyc"))
    return files


def main(threads: int = 16) -> None:
    py = python_files()
    print(json.dumps({"python_one_reader": timed_read(py[0::2], 1), "python_many_readers": timed_read(py[1::2], threads)}),
          flush=True)
    files = sorted(library_files(), key=lambda f: f.stat().st_size, reverse=True)
    halves: tuple[list[Path], list[Path]] = ([], [])
    sizes = [0, 0]
    for f in files:  # largest first onto the lighter half
        i = sizes.index(min(sizes))
        halves[i].append(f)
        sizes[i] += f.stat().st_size
    print(json.dumps({"one_reader": timed_read(halves[0], 1), "many_readers": timed_read(halves[1], threads)}),
          flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))

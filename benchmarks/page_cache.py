"""How much of torch's and NVIDIA's shared libraries is in the page cache (mincore; nothing is read):

    python benchmarks/page_cache.py [LABEL]

On a machine's first run they are on disk (0 of 3.8 GB on a fresh H200 machine), and every kernel
loaded on first use waits for a read: the first ViT-B run took 16.0 s against 10.8 s once they were
cached (BENCHMARKS.md section 24). Run it before a timing to know which case the timing is.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
from pathlib import Path


def resident(files: list[Path]) -> list[tuple[int, int, str]]:
    """(size, bytes in the page cache, name) per file."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    rows = []
    for f in files:
        size = f.stat().st_size
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: maps, reads nothing
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            libc.mincore(addr, size, vec)
            rows.append((size, min(sum(v & 1 for v in bytes(vec)) * page, size), f.name))
            libc.munmap(addr, size)
        finally:
            os.close(fd)
    return rows


def library_files() -> list[Path]:
    """torch's and NVIDIA's shared libraries (torch is not imported)."""
    torch_dir = Path(importlib.util.find_spec("torch").origin).parent
    files = list((torch_dir / "lib").glob("*.so*"))
    return files + [Path(p) for p in glob.glob(str(torch_dir.parent / "nvidia" / "*" / "lib" / "*.so*"))]


def main(label: str = "") -> None:
    rows = sorted(resident(library_files()), reverse=True)
    total, cached = sum(r[0] for r in rows), sum(r[1] for r in rows)
    print(f"PAGECACHE {label}: {cached / 1e9:.2f} of {total / 1e9:.2f} GB resident; "
          + ", ".join(f"{n} {r / 1e6:.0f}/{s / 1e6:.0f}MB" for s, r, n in rows[:6]), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:2])

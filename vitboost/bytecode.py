"""Python bytecode where an image forbids writing it: kept in vitboost's cache, compiled ahead on a first launch.

Many container images set PYTHONDONTWRITEBYTECODE over site-packages that hold no bytecode, so every process
compiles torch's and transformers' Python before it can start: 8.6 s of each launch on an H200 host
(BENCHMARKS.md section 30). A vitboost process there keeps its bytecode under ~/.cache/vitboost/bytecode
(Python's pycache_prefix: nothing is written beside the sources, which is what the variable protects), and
the first launch on a machine compiles what a run imports in worker processes, in the order a run imports it
(launch_modules.txt), while the main process imports. On the H200 host a first launch took 5.4 s instead of
12.9 s and later ones as long as with installed bytecode (section 31). VITBOOST_BYTECODE=off leaves Python as
it was told; VITBOOST_BYTECODE=<folder> moves the cache. This module imports nothing heavy: it runs before
torch loads.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

MANIFEST = Path(__file__).with_name("launch_modules.txt")  # module names in the order a run imports them
PROBE = "torch"  # the package whose bytecode says whether an environment has it (the biggest a run imports)
MAX_WORKERS = 12
_kept_here = False  # keep_bytecode() chose the folder in this process (no vitboost launcher handed it down)

# A worker: resolve every module of the manifest as the import system would (PathFinder, importing nothing,
# parents before children), compile every n-th one from offset k that has no bytecode yet. The workers
# walk the list side by side, so together they stay ahead of the main process's imports.
_WORKER = r"""
import importlib.machinery, importlib.util, json, os, py_compile, sys
manifest, k, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
places = {"": json.load(sys.stdin)}
os.nice(5)
names = open(manifest).read().split()
for i, name in enumerate(names):
    where = places.get(name.rpartition(".")[0])
    if where is None:
        continue
    try:
        spec = importlib.machinery.PathFinder.find_spec(name, where)
    except (ImportError, ValueError, OSError):
        continue
    if spec is None:
        continue
    if spec.submodule_search_locations:
        places[name] = list(spec.submodule_search_locations)
    if i % n != k or not (spec.origin or "").endswith(".py"):
        continue
    if not os.path.exists(importlib.util.cache_from_source(spec.origin)):
        py_compile.compile(spec.origin, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
"""


def cache_folder() -> Path | None:
    """Where this process should keep its bytecode: None when Python may write it itself, when the user
    chose a pycache_prefix of their own (theirs to manage; the folder handed down by a vitboost process that
    started this one is not), when the packages were installed with their bytecode (pip's default: Python
    reads it), or when VITBOOST_BYTECODE=off."""
    setting = os.environ.get("VITBOOST_BYTECODE", "")
    if setting.lower() in ("off", "0", "false", "no") or not sys.dont_write_bytecode:
        return None
    try:
        if setting:
            folder = Path(setting).expanduser()
        else:
            folder = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vitboost" / "bytecode"
    except RuntimeError:  # no home folder to expand ~ in: Python compiles in memory as it was told
        return None
    if sys.pycache_prefix and os.path.abspath(sys.pycache_prefix) != os.path.abspath(folder):
        return None
    if _has_bytecode(PROBE, beside_sources=True):  # a pycache_prefix would hide it
        return None
    return folder


def keep_bytecode(compile_ahead: bool = True, manifest: Path = MANIFEST) -> list[subprocess.Popen]:
    """Let this process (and the processes it starts: Inductor's compile workers) read and write bytecode
    under cache_folder(); when torch's is not there yet (PROBE) and compile_ahead (one process per machine: local
    rank 0), start workers that compile the manifest's modules ahead of the imports. Returns the workers;
    nobody needs to wait for them (a module they have not reached yet is compiled by the importer). Does
    nothing where the folder cannot be written: Python then compiles in memory as it was told."""
    folder = cache_folder()
    if folder is None:
        return []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return []
    if not os.access(folder, os.W_OK | os.X_OK):
        return []
    global _kept_here
    _kept_here = not sys.pycache_prefix  # not handed down by a vitboost launcher
    sys.pycache_prefix = str(folder)
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = str(folder)
    if not compile_ahead or not manifest.exists() or _has_bytecode(PROBE):
        return []
    return _start_workers(folder, manifest)


def uncached_bytecode() -> str | None:
    """A note when this process compiled torch's Python to bytecode and will again next time: Python is told
    not to write bytecode (PYTHONDONTWRITEBYTECODE, set in many container images), none is cached where it
    looks, and keep_bytecode() could not keep it (VITBOOST_BYTECODE=off, a folder it cannot write, or the
    user's own PYTHONPYCACHEPREFIX). That costs every launch ~9 s on an H200 host (12.9 s against 4.3 s,
    BENCHMARKS.md section 30). None otherwise, or if torch is not installed."""
    if not sys.dont_write_bytecode or _has_bytecode(PROBE):
        return None
    return ("launch: Python compiled torch's and transformers' bytecode in this process and will in every run "
            "(PYTHONDONTWRITEBYTECODE is set, none is cached where Python looks, and vitboost could not keep it: "
            "VITBOOST_BYTECODE=off, a folder it cannot write, or a PYTHONPYCACHEPREFIX of your own), ~9 s of each "
            "launch on a GPU host; to keep it, unset PYTHONDONTWRITEBYTECODE, let VITBOOST_BYTECODE name a "
            "writable folder, or run `python -m compileall -q` once on the site-packages folder")


def torchrun_note() -> str | None:
    """A note for a torchrun rank that kept its bytecode itself: its launcher, plain torchrun, could not, and
    imported torch without bytecode before it started any rank (2-3 s of each launch on an H200 host,
    BENCHMARKS.md section 32). None elsewhere, and under `vitboost launch`, which handed its folder down."""
    if not (_kept_here and "TORCHELASTIC_RUN_ID" in os.environ):
        return None
    return ("launch: torchrun's own process compiled torch's bytecode in memory before starting the ranks "
            "(PYTHONDONTWRITEBYTECODE is set and none is installed); `vitboost launch` takes the same options and "
            "keeps it: ~2 s less per launch on a GPU host")


def _has_bytecode(package: str, beside_sources: bool = False) -> bool:
    """Whether the package's __init__ has bytecode where this process looks now (beside_sources: in the
    __pycache__ folder beside it, where an installer puts it, whatever this process's pycache_prefix). True if
    the package is not installed, or not as Python source: nothing to compile for it."""
    spec = importlib.machinery.PathFinder.find_spec(package, sys.path)
    if spec is None or not (spec.origin or "").endswith(".py"):
        return True
    if beside_sources:
        opt = f".opt-{sys.flags.optimize}" if sys.flags.optimize else ""
        source = Path(spec.origin)
        return (source.parent / "__pycache__" / f"{source.stem}.{sys.implementation.cache_tag}{opt}.pyc").exists()
    return Path(importlib.util.cache_from_source(spec.origin)).exists()


def _start_workers(folder: Path, manifest: Path) -> list[subprocess.Popen]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, min(cpus - 2, MAX_WORKERS))  # the main process and its CUDA-start thread keep a core each
    search = json.dumps([p or os.getcwd() for p in sys.path]).encode()
    workers = []
    for k in range(n):
        try:
            w = subprocess.Popen([sys.executable, "-I", "-X", f"pycache_prefix={folder}", "-c", _WORKER,
                                  str(manifest), str(k), str(n)],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            w.stdin.write(search)
            w.stdin.close()
        except OSError:
            break
        workers.append(w)
    return workers

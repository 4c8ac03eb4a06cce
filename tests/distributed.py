"""Run a function in N gloo processes on CPU and collect what each rank returns.

Tests use this instead of torchrun so that a failure shows up as a normal
pytest traceback. The function must be importable (defined at module level).

A rank that has written its result leaves with ``os._exit(0)``, skipping the interpreter's
teardown. There, about once in 40 runs on 2 cores, a rank aborted ("terminate called without an
active exception"): a core dump showed gloo's worker thread dropping the last reference to a
finished collective's tensors (an FSDP all-gather's views), which takes the GIL, while the main
thread was already finalizing the interpreter, so the worker thread was killed mid-destructor.
A function that ends right after a collective on Python-visible tensors opens that window; the
CLI's torchrun ranks leave the same way (``vitboost.cli._leave``; BENCHMARKS.md section 25).
"""
from __future__ import annotations

import faulthandler
import os
import random
import socket
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A port no process holds now, from this pytest-xdist worker's own share of 20000-31999 (below Linux's
    ephemeral ports): two workers never pick the same port between its release here and its use by gloo
    or torchrun. (Asking the kernel for port 0 cannot be split by worker: bind() hands out even ports.)"""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % workers
    span = 12000 // workers
    for _ in range(1000):
        port = _PORTS.randrange(20000 + worker * span, 20000 + (worker + 1) * span)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in this worker's range")


_PORTS = random.Random()  # not the random module's generator: tests seed that one


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str,
            env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)  # the caller's environment now, not the fork server's at its start
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    faulthandler.enable(all_threads=True)  # a crash prints every thread's Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# Ranks fork from a server that has imported these once (~4 s a process on 2 cores, paid per rank
# per test with "spawn"; transformers' ViT ~3 s more: the whole suite went from 14.0 to 9.6 minutes).
mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "vitboost.train",
                                                     "transformers.models.vit.modeling_vit",
                                                     "tests.distributed"])


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(*args)``; return their results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out_dir, dict(os.environ)),
                               nprocs=world_size, join=True, start_method="forkserver")
        except Exception as e:  # report the rank's own traceback, not spawn's wrapper
            errors = []
            for r in range(world_size):
                p = os.path.join(out_dir, f"{r}.pt")
                if os.path.exists(p):
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise AssertionError("\n".join(errors) or str(e)) from None
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)["result"]
                for r in range(world_size)]

"""Run a function in N gloo processes on CPU and collect what each rank returns.

Tests use this instead of torchrun so that a failure shows up as a normal
pytest traceback. The function must be importable (defined at module level).
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
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


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Spawn ``world_size`` gloo ranks running ``fn(*args)``; return their results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out_dir),
                               nprocs=world_size, join=True, start_method="spawn")
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

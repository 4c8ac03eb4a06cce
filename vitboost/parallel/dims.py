"""ParallelDims: one object that checks a layout and builds the named DeviceMesh.

Modelled on torchtitan: the world is dp x pp x tp (outermost to innermost, so TP
ranks are neighbours and share the fastest links). Any dimension of size 1 is
still present in the mesh, so code can always ask for ``mesh["dp"]``.
"""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message says how to fix it."""


class PeerFailed(Exception):
    """Another rank failed on what only it does (rank 0 decodes the dataset) and printed why: this rank ends
    with exit code 2 and nothing more to say."""


@dataclass
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int = -1  # -1: inferred as world_size // (tp * pp)
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"--{name}_size must be >= 1, got {getattr(self, name)}")
        if self.dp == -1:
            if self.world_size % (self.tp * self.pp):
                raise LayoutError(
                    f"world size {self.world_size} is not divisible by tp_size*pp_size = "
                    f"{self.tp}*{self.pp}; launch a multiple of {self.tp * self.pp} processes "
                    f"(torchrun --nproc_per_node) or change --tp_size/--pp_size")
            self.dp = self.world_size // (self.tp * self.pp)
        if self.dp * self.tp * self.pp != self.world_size:
            raise LayoutError(
                f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.dp * self.tp * self.pp} "
                f"but world size is {self.world_size}; make them equal")

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Named mesh ("dp", "pp", "tp"); needs an initialised process group."""
        if self._mesh is None:
            self._mesh = init_device_mesh(device_type, (self.dp, self.pp, self.tp),
                                          mesh_dim_names=("dp", "pp", "tp"))
        return self._mesh

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("call build_mesh() first")
        return self._mesh


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, or (0, 0, 1)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


def any_rank(flag: bool) -> bool:
    """Collective: whether flag holds on any rank, the same answer on every rank (a barrier too). A CPU
    tensor: gloo carries it, beside nccl on CUDA (init_distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def init_distributed(device_type: str) -> None:
    """Initialise the default process group once (nccl on CUDA, gloo on CPU).

    A single process without torchrun gets a one-rank group on an in-memory store, so the
    same mesh, FSDP and checkpoint code runs everywhere with no special case.
    """
    if dist.is_initialized():
        return
    # CPU tensors (gemini's offloaded grads, the grad-norm of CPU shards) need gloo beside nccl
    backend = "cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo"
    _, local_rank, world = world_info()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if "WORLD_SIZE" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's store outlives a restart: prefix every key with the attempt, or the restarted
        # ranks read the dead ranks' gloo/nccl addresses for their sub-groups and hang
        rank = int(os.environ["RANK"])
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                             is_master=False, timeout=timedelta(minutes=10))
        store = dist.PrefixStore(f"vitboost/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", base)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group(backend)

"""Compile the blocks' shared graph in a background thread while the distillation teacher trains.

With ``--compile blocks`` every ViT block runs one compiled graph, compiled at the first training
step: on a fresh machine (no Inductor cache) that cost the recipe ~6 s before its first step
(BENCHMARKS.md section 22), after ~3.5 s of teacher training that does not depend on it. So the graph
is compiled beside the teacher, on a copy of the model cut to one block, with a batch of zeros shaped
like a training micro-batch: the real blocks then find it in dynamo's cache (same code, same guards)
and the first step only runs it. Inductor's kernel compiles run in its worker processes; the thread
mostly traces, which slows the teacher's host-bound loop a little (section 23: 3.7 -> 5-6 s, for
~8 s of compile moved off the critical path).

It starts once the teacher's step is captured as a CUDA graph, never before: its forward draws
drop-path masks from the device's generator, and a draw from another thread during a capture breaks
the capture ("Offset increment outside graph capture"). ``join`` puts that generator back as it was
at the start, so the student's random stream is what it would have been without this (the teacher's
captured step draws nothing from it).
"""
from __future__ import annotations

import contextlib
import copy
import threading
import time

import torch
from torch import Tensor, nn

from .parallel.tensor import find_blocks


class CompileAhead:
    """start() the compile in a thread; join() before the first training step (re-raises its error)."""

    def __init__(self, model: nn.Module, images: Tensor, autocast):
        self.model, self.images, self.autocast = model, images, autocast
        self.device = images.device
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="vitboost-compile-ahead", daemon=True)
        self._rng = None

    def start(self) -> "CompileAhead":
        self._rng = _rng_state(self.device)
        self._thread.start()
        return self

    def join(self, say=lambda *a: None) -> float:
        """Wait for the compile; the seconds the caller waited for it (0 if it never started: the
        first training step compiles then, as without this)."""
        if self._rng is None:
            return 0.0
        t0 = time.perf_counter()
        self._thread.join()
        self.model = self.images = None  # the zeros stay on the GPU otherwise, for the whole run
        _set_rng_state(self.device, self._rng)
        if self.error is not None:
            raise self.error
        waited = time.perf_counter() - t0
        say(f"compile: the blocks' graph compiled ahead in {self.seconds:.1f} s, {waited:.1f} s of it waited for")
        return waited

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            side = None
            if self.device.type == "cuda":  # its own stream: the teacher may be capturing a CUDA graph meanwhile
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.default_stream(self.device))  # the model's weights and the zeros
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                one = one_block_copy(self.model)
                with self.autocast():
                    logits = one(pixel_values=self.images).logits
                logits.float().mean().backward()  # the backward graph compiles too
            if side is not None:
                side.synchronize()
        except BaseException as e:  # handed to join(): the run fails loudly, not the thread quietly
            self.error = e
        self.seconds = time.perf_counter() - t0


def one_block_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (a single module whose blocks are compiled) keeping only its first block,
    compiled the same way. Its parameters are copies: nothing done to it touches the model."""
    first = find_blocks(model)[0][1]
    memo: dict[int, object] = {}
    for blocks in [m for m in model.modules() if any(c is first for c in m.children())]:
        memo[id(blocks)] = nn.ModuleList([copy.deepcopy(first, memo)])  # the other blocks are never copied
    one = copy.deepcopy(model, memo)
    for _, block in find_blocks(one):
        block.compile()  # a deep copy of a module leaves its compiled callable behind
    return one.train()


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def compile_ahead(engine, cfg, image_size: int) -> CompileAhead | None:
    """What compiles beside the teacher's training (start() it there), or None where it does not apply."""
    if not applies(engine.plan, engine.dims, cfg, engine.device.type):
        return None
    images = torch.zeros(cfg.batch_size, 3, image_size, image_size, device=engine.device)
    return CompileAhead(engine.model, images, engine.autocast)


def applies(plan, dims, cfg, device_type: str) -> bool:
    """A teacher to train, and blocks compiled in one unwrapped module on one GPU. FSDP/TP/PP wrap or
    split the blocks, so their graphs differ from a plain copy's; under DDP dynamo compiles inside DDP's
    forward differently, and the teacher's training ends in a broadcast: neither was measured beside a
    compile thread, so not there."""
    return (plan.compile == "blocks" and device_type == "cuda" and cfg.distillation_type != "none"
            and not dims.tp_enabled and not dims.pp_enabled and plan.data_parallel == "none"
            and not plan.cpu_offload)

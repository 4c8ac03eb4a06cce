"""The whole training step (forward, backward, clip, AdamW, zero grads) as one CUDA graph.

At small batches a ViT step is bound by the host: Python and kernel launches for ~1,000
kernels take longer than the GPU needs to run them (BENCHMARKS.md). Captured once and
replayed, the step costs one launch; the host is free to prepare the next batch.

What capture needs, and how it is met here:
- static inputs: each batch is copied into buffers the graph reads;
- nothing on the host inside the step: the clip keeps its norm on the device, fused AdamW
  runs with ``capturable=True`` and reads its learning rate from a device tensor that is
  refreshed from the scheduler's float before every replay (so the scheduler, its state and
  the checkpoints keep plain floats);
- warm-up on a side stream before capture (lazy state: AdamW moments, cuBLAS handles);
- FlashAttention / memory-efficient SDPA only: cuDNN attention failed inside a capture;
- other threads keep using CUDA meanwhile (a checkpoint's background write syncs its own stream; in
  the default global mode that invalidated the capture and crashed the run whenever an epoch ended
  before the capture step): only this thread's calls are checked (``capture_error_mode="thread_local"``).
Randomness (dropout, drop-path) comes from the default CUDA generator, which graphs advance
on every replay. Eval, checkpoint save and resume use the same parameter tensors outside the
graph; state loads that replace tensors (optimizer resume) happen before the capture.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def sdpa_for_capture():
    """FlashAttention first, memory-efficient as the fallback (cuDNN attention broke captures)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class GraphedStep:
    """``step(x, y) -> (loss, grad_norm)`` run eagerly ``warmup`` times, then captured and replayed.

    The returned tensors are the graph's static outputs: read (or copy) them before the next call.
    """

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer, warmup: int = 2):
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self._lrs: list[Tensor] = []

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), sdpa_for_capture():
                out = self.step(x, y)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self._capture(x, y)
        for group, lr in zip(self.optimizer.param_groups, self._lrs):
            lr.fill_(group["lr"])
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss, self.norm

    def _capture(self, x: Tensor, y: Tensor) -> None:
        torch.cuda.synchronize()
        self.x, self.y = x.clone(), y.clone()
        groups = self.optimizer.param_groups
        self._lrs = [torch.tensor(float(g["lr"]), device=x.device) for g in groups]
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self._lrs):
            g["capturable"], g["lr"] = True, lr  # captured by pointer; refreshed before each replay
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), sdpa_for_capture():
                self.loss, self.norm = self.step(self.x, self.y)
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
        self.graph = graph


def graph_unsupported_reason(*, device_type: str, data_parallel: str, tp: int, pp: int, cpu_offload: bool,
                             grad_accum: int) -> str | None:
    """Why the step cannot be one CUDA graph here, or None when it can. fp16 is captured too:
    the loss scale, its inf check, skipped steps and scale update stay on the device, inside fused
    AdamW (fused_clip_step; the GPU check matched eager's losses and skipped steps exactly, BENCHMARKS.md
    sections 19 and 35)."""
    if device_type != "cuda":
        return "no CUDA device"
    if data_parallel != "none" or tp > 1 or pp > 1 or cpu_offload:
        return "communication in the step (DDP/FSDP/TP/PP or CPU offload)"
    if grad_accum > 1:
        return "gradient accumulation"
    return None

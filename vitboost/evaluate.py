"""Evaluation that counts every sample of a split exactly once, under any strategy.

Each data-parallel rank takes a contiguous shard; shards are padded to the same number of
equal-size batches (sharded strategies need every rank in every collective) and the padded
rows are masked out of every sum. Sums (not means) are all-reduced over the dp group only:
TP and PP ranks hold the same logits and must not be counted twice.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import ImageSplit, StreamingSplit, normalize


def batches_per_rank(n: int, batch_size: int, dp_size: int = 1) -> int:
    """How many batches each data-parallel rank runs to evaluate n samples (padded shards)."""
    return math.ceil(math.ceil(n / dp_size) / batch_size)


@torch.no_grad()
def evaluate(engine, split: ImageSplit | StreamingSplit, label_names: list[str], *, batch_size: int, mean, std,
             dp_rank: int = 0, dp_size: int = 1, dp_group: dist.ProcessGroup | None = None) -> dict:
    device, n, c = engine.device, len(split), len(label_names)
    per_rank = math.ceil(n / dp_size)
    start, end = dp_rank * per_rank, min(n, (dp_rank + 1) * per_rank)
    sums = torch.zeros(2 + c * c, dtype=torch.float64, device=device)  # loss_sum, count, confusion
    for b in range(batches_per_rank(n, batch_size, dp_size)):
        ids = torch.arange(start + b * batch_size, start + (b + 1) * batch_size)
        valid = (ids < end).to(device)
        ids = ids.clamp(max=n - 1)
        images = normalize(split.batch(ids).to(device, non_blocking=True), mean, std)
        labels = split.labels[ids].to(device, non_blocking=True)
        logits = engine.logits(images)
        w = valid.double()
        sums[0] += (F.cross_entropy(logits, labels, reduction="none").double() * w).sum()
        sums[1] += w.sum()
        sums[2:] += torch.bincount(labels * c + logits.argmax(-1), weights=w, minlength=c * c)
    if dp_size > 1:
        dist.all_reduce(sums, group=dp_group)
    sums = sums.cpu()
    count = int(sums[1].item())
    if count != n:
        raise RuntimeError(f"evaluation counted {count} samples for a split of {n}")
    confusion = sums[2:].view(c, c).long()
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    return {"loss": sums[0].item() / n, "accuracy": confusion.diag().sum().item() / n, "num_samples": n,
            "per_class_accuracy": {name: round(per_class[i].item(), 6) for i, name in enumerate(label_names)},
            "confusion_matrix": confusion.tolist()}

"""The training batches of one rank, made several at a time.

Preparing a batch launches ~300 small kernels: the augmentation's per-op work (RandAugment's colour
ops, erasing, mixing) and a distillation teacher's forward. Their launch and fixed per-kernel costs
do not grow with the batch, so batches are gathered, augmented and shown to the teacher a chunk at a
time (up to ~1,000 images, ``CHUNK_BYTES`` of float images) and handed to the loop one by one.
Measured on beans (BENCHMARKS.md section 20): the teacher phase 8.9 -> 4.1 s, the recipe's step
14.5 -> 13.0 ms.

Each batch keeps its own mixup/cutmix draw, as timm's per-batch Mixup. Chunks start at the
epoch's start, and a checkpoint records the augmentation's random state at the start of the
chunk the next batch belongs to, so a resumed run remakes that chunk and skips what it trained:
resume stays bitwise. The chunk length depends only on the batch, the image size and the epoch's
length, so CPU and GPU runs draw the same augmentation.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .data import ImageSplit, StreamingSplit, iterate_batches

CHUNK_IMAGES = 1024  # enough to make the per-call launches negligible
CHUNK_BYTES = 512 * 2**20  # of float32 images per chunk (the augmentation's working set is ~3x that)

Transform = Callable[..., tuple[Tensor, Tensor]]  # (uint8 images, labels, groups=) -> (inputs, targets)


def chunk_batches(batch: int, image_size: int, per_epoch: int) -> int:
    """How many of this rank's batches (``batch`` images each) one chunk holds."""
    fit = min(CHUNK_IMAGES, CHUNK_BYTES // (3 * image_size * image_size * 4))
    return max(1, min(per_epoch, fit // batch))


class TrainBatches:
    """``for x, y in batches.epoch(e, start)``: this rank's (model inputs, targets) on ``device``.

    ``augment`` owns the random state (``state_dict``) and makes the inputs, unless a ``transform``
    around it does (a distiller); either takes ``groups=``: how many batches the chunk holds.
    """

    def __init__(self, split: ImageSplit | StreamingSplit, augment: Any, transform: Transform | None = None, *,
                 global_batch: int, per_epoch: int, dp: int, dp_rank: int, seed: int, image_size: int,
                 device: torch.device):
        self.split, self.augment, self.transform = split, augment, transform or augment
        self.global_batch, self.per_epoch, self.dp, self.dp_rank = global_batch, per_epoch, dp, dp_rank
        self.seed, self.device = seed, device
        self.chunk = chunk_batches(global_batch // dp, image_size, per_epoch)
        self._chunk_state: dict | None = None  # the augmentation's state when the current chunk was made
        self._left = 0  # batches of the current chunk not yet handed out

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The epoch's first ``per_epoch`` batches from batch ``start`` on (a resumed run: mid-epoch)."""
        first = start - start % self.chunk  # the chunk that batch belongs to, remade from its start
        order = list(iterate_batches(len(self.split), self.global_batch, shuffle=True, seed=self.seed, epoch=epoch,
                                     drop_last=True, start=first))[:self.per_epoch - first]
        chunks = [order[i:i + self.chunk] for i in range(0, len(order), self.chunk)]
        skip = start - first
        for group, (images, labels) in zip(chunks, self._gathered(chunks)):
            self._chunk_state = self.augment.state_dict()
            x, y = self.transform(images.to(self.device, non_blocking=True),
                                  labels.to(self.device, non_blocking=True), groups=len(group))
            self._left = len(group) - skip
            for xb, yb in list(zip(x.chunk(len(group)), y.chunk(len(group))))[skip:]:
                self._left -= 1
                yield xb, yb
            skip = 0

    def _gathered(self, chunks: list[list[Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        """(uint8 images, labels) of each chunk: this rank's slice of every global batch in it. A streamed
        split decodes the next chunk in a background thread while the current one trains."""
        def take(group: list[Tensor]) -> tuple[Tensor, Tensor]:
            return self.split.take(torch.cat([b.chunk(self.dp)[self.dp_rank] for b in group]))

        if not isinstance(self.split, StreamingSplit):
            yield from map(take, chunks)
            return
        with ThreadPoolExecutor(1) as pool:
            ahead = [pool.submit(take, g) for g in chunks[:1]]
            for i in range(len(chunks)):
                done = ahead.pop().result()
                if i + 1 < len(chunks):
                    ahead.append(pool.submit(take, chunks[i + 1]))
                yield done

    def state_dict(self) -> dict:
        """The augmentation's state at the start of the chunk that holds the next batch."""
        return self._chunk_state if self._left > 0 else self.augment.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.augment.load_state_dict(state)
        self._chunk_state, self._left = None, 0

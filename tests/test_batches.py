"""Training batches made a chunk at a time (vitboost.batches): what the loop gets must not depend on it."""
from __future__ import annotations

import pytest
import torch

import vitboost.batches as batches_mod
from vitboost.augment import AugmentConfig, GpuAugment
from vitboost.batches import TrainBatches, chunk_batches
from vitboost.data import ImageSplit

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _split(n: int = 40, size: int = 16) -> ImageSplit:
    g = torch.Generator().manual_seed(0)
    return ImageSplit(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 5)


def _batches(split: ImageSplit, batch: int = 8, per_epoch: int = 5, dp: int = 1, dp_rank: int = 0,
             preset: str = "strong") -> TrainBatches:
    augment = GpuAugment(AugmentConfig.preset(preset), 5, MEAN, STD, seed=3)
    return TrainBatches(split, augment, global_batch=batch * dp, per_epoch=per_epoch, dp=dp, dp_rank=dp_rank,
                        seed=1, image_size=16, device=torch.device("cpu"))


def test_a_chunk_holds_about_a_thousand_images_within_a_memory_budget_and_never_crosses_an_epoch():
    assert chunk_batches(128, 160, per_epoch=8) == 8        # beans, vit-tiny@160: the whole epoch at once
    assert chunk_batches(32, 224, per_epoch=32) == 27        # 512 MiB of float32 224 px images: 891
    assert chunk_batches(128, 384, per_epoch=100) == 2
    assert chunk_batches(4096, 224, per_epoch=10) == 1       # big batches: one at a time, as before
    assert chunk_batches(8, 16, per_epoch=3) == 3


@pytest.mark.parametrize("chunk_images", [16, 1024])  # chunks of 2 batches (3 per epoch), or the whole epoch
def test_a_run_resumed_at_any_batch_gets_exactly_the_batches_an_unbroken_run_gets(chunk_images, monkeypatch):
    monkeypatch.setattr(batches_mod, "CHUNK_IMAGES", chunk_images)
    split = _split()
    straight, states = [], []
    src = _batches(split)
    for epoch in range(2):
        for x, y in src.epoch(epoch):
            straight.append((epoch, x.clone(), y.clone()))
            states.append(src.state_dict())  # what a checkpoint after this batch would hold
    assert len(straight) == 10
    for k in range(len(straight) - 1):
        resumed = _batches(split)
        resumed.load_state_dict(states[k])
        epoch, start = divmod(k + 1, 5)
        got = [(e, x, y) for e in range(epoch, 2) for x, y in resumed.epoch(e, start if e == epoch else 0)]
        assert len(got) == len(straight) - k - 1
        for (e0, x0, y0), (e1, x1, y1) in zip(straight[k + 1:], got):
            assert e0 == e1 and torch.equal(x0, x1) and torch.equal(y0, y1), k


def test_each_batch_of_a_chunk_is_mixed_within_itself():
    split = ImageSplit(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16))
    augment = GpuAugment(AugmentConfig.preset("none").with_(mixup_alpha=0.8), 16, MEAN, STD, seed=0)
    src = TrainBatches(split, augment, global_batch=4, per_epoch=4, dp=1, dp_rank=0, seed=0, image_size=8,
                       device=torch.device("cpu"))
    assert src.chunk == 4
    lams = set()
    for x, y in src.epoch(0):
        support = (y > 0).nonzero()[:, 1].unique()  # 16 distinct labels: a row mixed with another batch shows it
        assert len(support) <= 4, "a batch was mixed with images of another batch"
        lams.add(round(float(y.max()), 4))
        torch.testing.assert_close(y.sum(1), torch.ones(4))
    assert len(lams) > 1  # every batch drew its own lambda


def test_data_parallel_ranks_take_their_slices_of_each_global_batch():
    split = _split()
    seen = [[x for x, _ in _batches(split, batch=4, dp=2, dp_rank=rank, preset="none").epoch(0)] for rank in range(2)]
    for (x, _), a, b in zip(_batches(split, batch=8, preset="none").epoch(0), *seen):
        assert torch.equal(x, torch.cat([a, b]))

"""Throughput of GpuAugment (img/s) on the best available device.

Why: augmentation must outrun the model; timm's CPU pipeline caps near
~950 img/s. Not run by the tests.

    python benchmarks/augment_throughput.py                 # strong, batch 256, 224px
    python benchmarks/augment_throughput.py --device cpu --batch 64 --preset light
    python benchmarks/augment_throughput.py --device-time   # + GPU busy time per batch

img/s is wall clock of back-to-back calls. GpuAugment never waits on the
GPU, so in training its host time overlaps the previous step's GPU work and
the real cost is the GPU busy time, which --device-time reports.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from vitboost.augment import AugmentConfig, GpuAugment  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(preset: str, batch: int, size: int, device: torch.device, iters: int, warmup: int,
            device_time: bool = False, num_classes: int = 1000) -> tuple[float, float | None]:
    """(img/s, GPU busy ms per batch or None) for one preset, batch already on the device."""
    aug = GpuAugment(AugmentConfig.preset(preset), num_classes=num_classes,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), device=device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    for _ in range(warmup):
        aug(images, labels)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        aug(images, labels)
    _sync(device)
    rate = batch * iters / (time.perf_counter() - t0)
    busy = None
    if device_time and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                aug(images, labels)
            _sync(device)
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1000
    return rate, busy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="strong", nargs="+", help="one or more of none/light/strong")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--device-time", action="store_true", help="also report GPU busy ms per batch")
    args = p.parse_args()
    device = torch.device(args.device)
    presets = [args.preset] if isinstance(args.preset, str) else args.preset
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    for preset in presets:
        rate, busy = measure(preset, args.batch, args.size, device, args.iters, args.warmup,
                             args.device_time)
        extra = f"  (GPU busy {busy:.2f} ms/batch = {args.batch / busy * 1000:,.0f} img/s)" if busy else ""
        print(f"{preset:>6}  batch {args.batch}  {args.size}px  on {where}: {rate:,.0f} img/s{extra}")


if __name__ == "__main__":
    main()

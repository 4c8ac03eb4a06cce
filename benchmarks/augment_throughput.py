"""Throughput of GpuAugment (img/s) on the best available device.

Why: augmentation must outrun the model; timm's CPU pipeline caps near
~950 img/s. Not run by the tests.

    python benchmarks/augment_throughput.py                 # strong, batch 256, 224px
    python benchmarks/augment_throughput.py --device cpu --batch 64 --preset light
"""
from __future__ import annotations

import argparse
import time

import torch

from vitboost.augment import AugmentConfig, GpuAugment


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(preset: str, batch: int, size: int, device: torch.device,
            iters: int, warmup: int, num_classes: int = 1000) -> float:
    """img/s for one preset: uint8 batch already on the device, as in training."""
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
    return batch * iters / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="strong", nargs="+", help="one or more of none/light/strong")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    presets = [args.preset] if isinstance(args.preset, str) else args.preset
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    for preset in presets:
        rate = measure(preset, args.batch, args.size, device, args.iters, args.warmup)
        print(f"{preset:>6}  batch {args.batch}  {args.size}px  on {where}: {rate:,.0f} img/s")


if __name__ == "__main__":
    main()

"""Our GPU augmentation (vitboost/augment.py, `--augment strong`) against kornia doing the same ops.

Why: augment.py is 644 hand-written lines; kornia is the maintained library for batched GPU
augmentation. It replaces ours only if it keeps training from ever waiting on augmentation and
matches accuracy and resumability. This script measures that; it decides nothing by itself.

    python benchmarks/augment_kornia.py speed --json results/augment_kornia.json      # one GPU, ~1 min
    python benchmarks/augment_kornia.py train --seed 42 -- --config configs/beans_scratch.yaml \\
        --dataset data/beans --output results/aug/kornia_s42                           # beans accuracy, kornia
    python benchmarks/augment_kornia.py speed --device cpu --batch 4 --size 32 --model vit-micro --iters 2

`speed`, per batch size (default 128 and 256), on uint8 batches already on the device:
- ms/batch and img/s of each pipeline alone: CUDA events around windows of back-to-back calls,
  after a warm-up; the median window;
- host ms per call (the Python/launch cost; it overlaps GPU work unless the call syncs) and the
  device syncs per call (torch.cuda.set_sync_debug_mode): a sync makes the host wait for the
  previous training step, so the GPU idles while the next one is launched;
- resumable: restoring the state a checkpoint keeps (ours: augment.state_dict(); kornia: the
  global torch CPU/CUDA RNG states, which the trainer saves) replays the same batch bitwise;
- the training step it must keep up with (--model, default vit-small, bf16, AdamW) alone, and the
  loop augment + step: overhead = how much slower the loop is than the step on pre-augmented data.
  0% means training never waits on augmentation.

`train` runs `vitboost train` with kornia in place of GpuAugment (same flags), for the accuracy
comparison with BENCHMARKS.md section 13 (ours, same recipe, seeds 42-44).

The kornia pipeline (kornia.augmentation, float images in [0, 1]): RandomResizedCrop (0.08-1,
3/4-4/3) -> RandomHorizontalFlip 0.5 -> auto.RandAugment(n=2, m=27: timm's m9 on kornia's 0-30
scale; translate range 0.45 of the size as timm and ours) -> Normalize -> RandomErasing(0.25,
constant 0 = the mean after normalization) -> per batch, with probability 0.5 each,
RandomMixUpV2 or RandomCutMixV2 -> smoothed (0.1) soft targets. Differences that remain, all
kornia's own design: RandAugment picks its 2 ops per batch (timm/ours: per sample, each applied
with p 0.5 and magnitude noise 0.5); mixup lambda is U(0, 1) per sample (timm/ours: one
Beta(0.8, 0.8) per batch); erasing fills a constant (timm/ours: per-pixel normal noise).
kornia is imported lazily: the GPU hosts need its wheels (kornia, kornia_rs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
from vitboost.augment import AugmentConfig, GpuAugment, soft_cross_entropy  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the ViT image processor's


def import_kornia():
    try:
        import kornia
        import kornia.augmentation  # noqa: F401
    except ImportError as e:
        sys.exit(f"error: kornia is not installed ({e}); pip install kornia (wheels: kornia, kornia_rs)")
    return kornia


class KorniaAugment:
    """The `strong` preset with kornia ops, behind GpuAugment's interface, so the trainer can run it."""

    def __init__(self, cfg: AugmentConfig, num_classes: int, mean: Sequence[float], std: Sequence[float],
                 seed: int = 0, device: torch.device | str | None = None, crop_mode: str = "resample"):
        kornia = import_kornia()
        import kornia.augmentation as K
        from kornia.augmentation.auto import RandAugment
        from kornia.augmentation.auto.rand_augment.rand_augment import default_policy
        self.cfg, self.num_classes = cfg, num_classes
        torch.manual_seed(seed)  # kornia draws from the global RNG: one stream per dp rank, as ours
        self.version = kornia.__version__
        self._crop = None
        if cfg.scale[0] < 1.0:  # built at the first call: its output size is the input's
            self._crop = lambda size: K.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio,
                                                           cropping_mode=crop_mode)
        self._crops: dict[tuple[int, int], Any] = {}
        ops: list = []
        if cfg.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.randaug_n > 0:
            policy = [[(n, -0.45, 0.45)] if n in ("translate_x", "translate_y") else [(n, lo, hi)]
                      for [(n, lo, hi)] in default_policy]
            ops.append(RandAugment(n=cfg.randaug_n, m=max(1, min(29, round(cfg.randaug_m * 3))), policy=policy))
        self.flip_and_randaug = ops
        self.normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))
        self.erase = K.RandomErasing(p=cfg.random_erase, value=0.0) if cfg.random_erase > 0 else None
        self.mixup = K.RandomMixUpV2(p=cfg.mix_prob, data_keys=["input", "class"]) if cfg.mixup_alpha > 0 else None
        self.cutmix = (K.RandomCutMixV2(p=cfg.mix_prob, beta=cfg.cutmix_alpha, data_keys=["input", "class"],
                                        use_correct_lambda=True) if cfg.cutmix_alpha > 0 else None)

    @property
    def soft_targets(self) -> bool:
        return self.cfg.soft_targets

    def state_dict(self) -> dict[str, Any]:
        return {}  # kornia draws from torch's global RNGs, which the trainer's checkpoint restores

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_uint8.float().div_(255.0)
        if self._crop is not None:
            size = tuple(x.shape[-2:])
            if size not in self._crops:
                self._crops[size] = self._crop(size)
            x = self._crops[size](x)
        for op in self.flip_and_randaug:
            x = op(x)
        x = self.normalize(x)
        if self.erase is not None:
            x = self.erase(x)
        if not self.cfg.soft_targets:
            return x, labels
        K, s = self.num_classes, self.cfg.label_smoothing
        onehot = lambda y: torch.full((y.shape[0], K), s / K, device=x.device).scatter_(  # noqa: E731
            1, y.long().view(-1, 1), 1 - s + s / K)
        mix = [m for m in (self.mixup, self.cutmix) if m is not None]
        if not mix or x.shape[0] < 2:
            return x, onehot(labels)
        op = mix[int(torch.rand(()) < 0.5)] if len(mix) == 2 else mix[0]  # timm's switch_prob 0.5
        x, lab = op(x, labels)
        if lab.dim() == 3:  # cutmix: (num_mix, B, 3), lam = the original's weight
            lab = lab[0]
            lam = lab[:, 2:3]
            return x, lam * onehot(lab[:, 0]) + (1 - lam) * onehot(lab[:, 1])
        lam = lab[:, 2:3]  # mixup: lam = the partner's weight
        return x, (1 - lam) * onehot(lab[:, 0]) + lam * onehot(lab[:, 1])


# ------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window_ms(fn: Callable[[], Any], iters: int, windows: int, warmup: int, device: torch.device) -> float:
    """Median over windows of the per-call time of back-to-back calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(windows):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(times)


def host_ms(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Median host time of one call, without waiting for the device (what the CPU spends launching)."""
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    return statistics.median(times)


def syncs_per_call(fn: Callable[[], Any], calls: int, device: torch.device) -> float | None:
    """Device->host synchronizations per call, counted by torch's sync debug mode (CUDA only)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / calls


def resumable(aug, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> bool:
    """Restore what a checkpoint keeps (augment state + global RNGs) and replay: same batch bitwise?"""
    state = (aug.state_dict(), torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def restore() -> None:
        aug.load_state_dict(state[0])
        torch.set_rng_state(state[1])
        if state[2] is not None:
            torch.cuda.set_rng_state(state[2], device)

    restore()
    x1, y1 = aug(images.clone(), labels)
    restore()
    x2, y2 = aug(images.clone(), labels)
    return bool(torch.equal(x1, x2) and torch.equal(y1, y2))


def train_step_fn(model_name: str, size: int, num_classes: int, device: torch.device):
    """A vitboost-built ViT training step (bf16 autocast on GPU, fused AdamW), never syncing."""
    from vitboost.model import build_model
    torch.manual_seed(0)
    model, _ = build_model(model_name, [str(i) for i in range(num_classes)], pretrained="none",
                           image_size=size, log=lambda *_: None)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(pixel_values=x).logits
        soft_cross_entropy(logits.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def speed(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    kornia = import_kornia()
    cfg = AugmentConfig.preset("strong")
    pipelines = {
        "vitboost": lambda: GpuAugment(cfg, args.num_classes, MEAN, STD, seed=0, device=device),
        "kornia": lambda: KorniaAugment(cfg, args.num_classes, MEAN, STD, seed=0, crop_mode="resample"),
        "kornia_slice_crop": lambda: KorniaAugment(cfg, args.num_classes, MEAN, STD, seed=0, crop_mode="slice"),
    }
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        images = torch.randint(0, 256, (batch, 3, args.size, args.size), dtype=torch.uint8, generator=g).to(device)
        labels = torch.randint(0, args.num_classes, (batch,), generator=g).to(device)
        step = None
        if not args.no_step:
            step = train_step_fn(args.model, args.size, args.num_classes, device)
            x0, y0 = GpuAugment(cfg, args.num_classes, MEAN, STD, seed=1, device=device)(images, labels)
            step_ms = window_ms(lambda: step(x0, y0), args.iters, args.windows, args.warmup, device)
        for name, make in pipelines.items():
            aug = make()
            call = lambda: aug(images, labels)  # noqa: E731
            ms = window_ms(call, args.iters, args.windows, args.warmup, device)
            row = {"pipeline": name, "batch": batch, "size": args.size, "ms_per_batch": round(ms, 3),
                   "img_per_s": round(batch / ms * 1e3, 1), "host_ms_per_call": round(host_ms(call, args.iters, device), 3),
                   "syncs_per_call": syncs_per_call(call, 3, device), "resumable": resumable(aug, images, labels, device)}
            if step is not None:
                def loop() -> None:
                    step(*aug(images, labels))
                loop_ms = window_ms(loop, args.iters, args.windows, args.warmup, device)
                row.update(model=args.model, step_ms=round(step_ms, 3), loop_ms=round(loop_ms, 3),
                           overhead_pct=round(100 * (loop_ms / step_ms - 1), 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"device": where, "torch": torch.__version__, "kornia": kornia.__version__, "preset": "strong",
            "iters": args.iters, "windows": args.windows, "warmup": args.warmup, "rows": rows}


def table(result: dict) -> str:
    head = ["pipeline", "batch", "img/s", "ms/batch", "host ms/call", "syncs/call", "resumable",
            "step ms", "aug+step ms", "overhead"]
    lines = [f"{result['device']}, torch {result['torch']}, kornia {result['kornia']}, strong preset, "
             f"{result['rows'][0]['size']} px, median of {result['windows']} windows x {result['iters']} calls\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["pipeline"], r["batch"], f"{r['img_per_s']:,.0f}", r["ms_per_batch"], r["host_ms_per_call"],
                 "-" if r["syncs_per_call"] is None else f"{r['syncs_per_call']:g}", "yes" if r["resumable"] else "NO",
                 r.get("step_ms", "-"), r.get("loop_ms", "-"),
                 f"{r['overhead_pct']:+.1f}%" if "overhead_pct" in r else "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def train(args: argparse.Namespace, rest: list[str]) -> int:
    """`vitboost train` with KorniaAugment in GpuAugment's place (flags after --)."""
    import_kornia()
    import vitboost.train
    from vitboost.cli import main
    vitboost.train.GpuAugment = KorniaAugment
    flags = [f for f in rest if f != "--"]
    return main(["train", "--seed", str(args.seed), "--augment", "strong", *flags])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="throughput, host cost, syncs, resumability, overhead on a training step")
    s.add_argument("--batch", type=int, nargs="+", default=[128, 256])
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--num_classes", type=int, default=3)
    s.add_argument("--model", default="vit-small", help="the training step to keep up with (a vitboost named config)")
    s.add_argument("--no_step", action="store_true", help="time the augmentations only")
    s.add_argument("--iters", type=int, default=10, help="calls per timing window")
    s.add_argument("--windows", type=int, default=5)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--json", help="write the result here")
    t = sub.add_parser("train", help="vitboost train with kornia augmentation; vitboost flags after --")
    t.add_argument("--seed", type=int, default=42)
    args, rest = p.parse_known_args(argv)
    if args.command == "train":
        return train(args, rest)
    if rest:
        p.error(f"unknown arguments {rest}")
    result = speed(args)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

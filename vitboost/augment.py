"""Batched data augmentation on the training device.

Why: a CPU/PIL pipeline (timm's) tops out near 1k img/s, which starves a GPU
training a small ViT. The training set is cached as uint8 [N, 3, S, S], so we
augment whole batches where they already are, with plain torch ops:

1. geometry: random resized crop, flips, rotation and RandAugment's
   rotate/shear/translate folded into ONE per-sample affine matrix and ONE
   ``grid_sample`` (bilinear);
2. colour: colour jitter and RandAugment's colour ops, vectorised with
   per-sample magnitudes; each op runs only on the samples that drew it
   (a loop over op types, never over images);
3. normalisation, random erasing (timm 'pixel' mode);
4. mixup / cutmix per batch (timm semantics) with label smoothing folded into
   soft targets.

Semantics follow timm's DeiT recipe (``rand-m9-mstd0.5-inc1``, ``Mixup``,
``RandomErasing``) closely but not bit-for-bit: see ``GpuAugment``.

Per-sample parameters are drawn on the host (tiny tensors), so the host
knows which samples each op touches: the device does only the needed work
and the call never waits on the device (no .item(), no nonzero on CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentConfig", "GpuAugment", "soft_cross_entropy", "RANDAUG_OPS"]


@dataclass
class AugmentConfig:
    """What to augment and how hard. Defaults: crop + nothing else."""

    scale: tuple[float, float] = (0.08, 1.0)   # random resized crop area range; (1, 1) = no crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rotate: float = 0.0          # max degrees, uniform in [-rotate, rotate]
    color_jitter: float = 0.0    # brightness/contrast/saturation strength
    randaug_n: int = 0           # RandAugment-style: number of ops per image
    randaug_m: float = 9.0       # magnitude 0..10
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    label_smoothing: float = 0.0
    random_erase: float = 0.0    # probability
    # timm's rand-m9-mstd0.5 details: per-op magnitude noise and per-op apply probability.
    randaug_mstd: float = 0.5
    randaug_p: float = 0.5

    def __post_init__(self) -> None:
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        self.ratio = (float(self.ratio[0]), float(self.ratio[1]))
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < lo <= hi, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for name in ("hflip", "vflip", "mix_prob", "random_erase", "randaug_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.randaug_n < 0 or self.mixup_alpha < 0 or self.cutmix_alpha < 0 or self.rotate < 0:
            raise ValueError("randaug_n, mixup_alpha, cutmix_alpha and rotate must be >= 0")

    @classmethod
    def preset(cls, name: str) -> "AugmentConfig":
        """Named recipes: 'none' (normalise only), 'light' (crop (0.5, 1) + hflip),
        'strong' (DeiT-like, for training small data from scratch)."""
        if name == "none":
            return cls(scale=(1.0, 1.0), hflip=0.0)
        if name == "light":
            return cls(scale=(0.5, 1.0), hflip=0.5)
        if name == "strong":
            return cls(scale=(0.08, 1.0), hflip=0.5, randaug_n=2, randaug_m=9.0,
                       mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                       random_erase=0.25)
        raise ValueError(f"unknown augment preset {name!r}; expected none, light or strong")

    def with_(self, **kw: Any) -> "AugmentConfig":
        """Copy with some fields changed (validated)."""
        return replace(self, **kw)

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix can ever be applied."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def soft_targets(self) -> bool:
        """Whether GpuAugment returns float [B, K] targets instead of class ids."""
        return self.mixes or self.label_smoothing > 0


# timm's _RAND_INCREASING_TRANSFORMS, in its order (DeiT uses rand-m9-mstd0.5-inc1).
RANDAUG_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)
_OP = {name: i for i, name in enumerate(RANDAUG_OPS)}
_GRAY = (0.299, 0.587, 0.114)   # PIL's 'L' conversion weights


# ---------------------------------------------------------------------------
# colour ops on float images in [0, 1]; per-sample params are [n] tensors
# ---------------------------------------------------------------------------

def _bcast(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _gray(x: Tensor) -> Tensor:
    g = x[:, 0:1] * _GRAY[0]
    return g.add_(x[:, 1:2], alpha=_GRAY[1]).add_(x[:, 2:3], alpha=_GRAY[2])


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), clipped."""
    return torch.lerp(degenerate.expand_as(x), x, _bcast(factor)).clamp_(0.0, 1.0)


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _bcast(factor)).clamp_(0.0, 1.0)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x.mean(dim=(2, 3), keepdim=True)), factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _gray(x), factor)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """PIL SHARPEN degenerate: [[1,1,1],[1,5,1],[1,1,1]]/13 on the interior, border kept."""
    # (9 * box mean + 4 * centre) / 13; avg_pool beats a depthwise conv2d on CPU and GPU
    degenerate = x.clone()
    inner = degenerate[:, :, 1:-1, 1:-1]
    inner.mul_(4.0 / 13.0).add_(F.avg_pool2d(x, 3, stride=1), alpha=9.0 / 13.0)
    return _blend(x, degenerate, factor)


def _autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel to [0, 1]; flat channels are left alone (as PIL)."""
    lo, hi = x.flatten(2).aminmax(dim=2)
    ok = hi > lo
    scale = torch.where(ok, 1.0 / (hi - lo).clamp_min(1e-12), 1.0)
    shift = torch.where(ok, -lo * scale, 0.0)
    return torch.addcmul(shift[..., None, None], x, scale[..., None, None]).clamp_(0.0, 1.0)


def _equalize(x: Tensor) -> Tensor:
    """Per-channel histogram equalisation on 256 levels, PIL's lookup table."""
    n, c, h, w = x.shape
    q = (x * 255.0).round_().clamp_(0, 255).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, q, torch.ones_like(q))
    # PIL: step = (pixels - count of the last non-empty bin) // 255
    last_bin = 255 - (hist.flip(1) > 0).long().argmax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, last_bin)) // 255
    cum = hist.cumsum(1) - hist  # exclusive cumsum
    lut = ((cum + step // 2) // step.clamp_min(1)).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return out.view(n, c, h, w).to(x.dtype) / 255.0


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` bits of each 8-bit value (0 bits -> black, as PIL)."""
    step = _bcast(torch.exp2(8.0 - bits))            # quantisation step in 8-bit levels
    return (x * 255.0).round_().div_(step).floor_().mul_(step / 255.0)


def _invert(x: Tensor) -> Tensor:
    return 1.0 - x


def _solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return torch.where(x >= _bcast(threshold), 1.0 - x, x)


def _solarize_add(x: Tensor, add: Tensor) -> Tensor:
    return torch.where(x < 128.0 / 255.0, (x + _bcast(add)).clamp_(max=1.0), x)


# ---------------------------------------------------------------------------
# affine helpers: [B, 3, 3] matrices mapping output -> input coordinates
# ---------------------------------------------------------------------------

def _affine(a: Tensor, b: Tensor, c: Tensor, d: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, tx, c, d, ty, z, z, o], dim=1).view(-1, 3, 3)


def _np(fn: Any, t: Tensor) -> Tensor:
    """Elementwise numpy maths on a tiny host tensor.

    Why: with many intra-op threads, torch's CPU exp/sqrt/cos/round on a few
    hundred values were seen to cost 0.1-1 ms each (threaded vector maths);
    numpy costs a few us.
    """
    return torch.from_numpy(fn(t.numpy()))


def _sqrt_round(a: np.ndarray) -> np.ndarray:
    return np.round(np.sqrt(a))   # half to even, like timm's Python round()


def _rotation(deg: Tensor) -> Tensor:
    rad = deg * (math.pi / 180.0)
    z = torch.zeros_like(rad)
    cos, sin = _np(np.cos, rad), _np(np.sin, rad)
    return _affine(cos, -sin, sin, cos, z, z)


def _theta(m: Tensor, H: int, W: int) -> Tensor:
    """Pixel-centred matrices m [B, 3, 3] -> affine_grid's normalised theta [B, 2, 3].

    theta = P^-1 m P with P = diag(W/2, H/2, 1).
    """
    p = torch.tensor([W / 2, H / 2, 1.0], dtype=m.dtype)
    return (m * p.view(1, 1, 3) / p.view(1, 3, 1))[:, :2].contiguous()


def _affine_grid(theta: Tensor, H: int, W: int) -> Tensor:
    """F.affine_grid(theta, align_corners=False), built by broadcasting on any device.

    Why: affine_grid materializes a base grid [B, H, W, 3] and runs a batched fp32 matmul over it:
    ~4x slower than this on CPU, and 1.7 ms for a chunk of 1,024 160 px images on an H200
    (BENCHMARKS.md section 20), where this is a few elementwise kernels.
    """
    B, dev = theta.shape[0], theta.device
    u = (torch.arange(W, dtype=theta.dtype, device=dev) * 2 + 1) / W - 1   # pixel centres in [-1, 1]
    v = ((torch.arange(H, dtype=theta.dtype, device=dev) * 2 + 1) / H - 1).view(H, 1)
    t = theta.view(B, 2, 3, 1, 1)
    grid = torch.empty(B, H, W, 2, dtype=theta.dtype, device=dev)
    grid[..., 0] = t[:, 0, 0] * u + t[:, 0, 1] * v + t[:, 0, 2]
    grid[..., 1] = t[:, 1, 0] * u + t[:, 1, 1] * v + t[:, 1, 2]
    return grid


class GpuAugment:
    """Augment a uint8 batch on its own device; see the module docstring.

    ``mean``/``std`` are per-channel in [0, 1] units (as HF image processors
    give them). Pass a distinct ``seed`` per data-parallel rank.

    Randomness: per-sample parameters (which op, magnitudes, boxes, lambda)
    come from a small CPU generator, so the host knows which samples each op
    touches and launches work only for those, with no device->host sync; the
    bulk noise of random erasing comes from a generator on the images' device.
    Both are seeded from ``seed`` and both are in ``state_dict()`` (the noise
    state is device-specific: resume on the same kind of device). A side
    effect: CPU and CUDA draw identical parameters for the same seed.

    Differences from timm worth knowing: RandAugment's geometric ops are
    composed into the crop warp (so they act before the colour ops, not
    interleaved with them) and are centred on the image; areas uncovered by
    rotate/shear/translate are filled with ``mean`` (timm: ImageNet mean);
    crops are integer pixel boxes as in timm but resized bilinearly mapping
    outer pixel centres to outer pixel centres; colour ops see the bilinear
    float output rather than uint8 values.
    """

    def __init__(self, cfg: AugmentConfig, num_classes: int, mean: Sequence[float] | Tensor,
                 std: Sequence[float] | Tensor, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self._mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        self._std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if self._mean.max() > 1.0 or self._std.max() > 1.0 or (self._std <= 0).any():
            raise ValueError("mean/std must be in [0, 1] units (e.g. 0.485, not 123.675)")
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._host = torch.Generator().manual_seed(self.seed)
        self._noise: torch.Generator | None = None
        self._pending_noise_state: Tensor | None = None
        if device is not None:
            self._noise_generator(torch.device(device))

    # -- generators / checkpointing ------------------------------------------------

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        """Generator for bulk noise, on the images' device (created on first use)."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._noise is None:
            self._noise = torch.Generator(device=device)
            self._noise.manual_seed(self.seed)
            if self._pending_noise_state is not None:
                self._noise.set_state(self._pending_noise_state)
                self._pending_noise_state = None
        elif self._noise.device != device:
            raise ValueError(f"GpuAugment noise generator is on {self._noise.device}, images on {device}")
        return self._noise

    def state_dict(self) -> dict[str, Any]:
        """Generator states, so a resumed run continues the same augmentation stream."""
        noise = self._noise.get_state() if self._noise is not None else self._pending_noise_state
        return {"seed": self.seed, "host": self._host.get_state(), "noise": noise}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._host.set_state(state["host"])
        noise = state.get("noise")
        if noise is None:  # the noise stream was never used: restart it from the seed
            self._noise, self._pending_noise_state = None, None
        elif self._noise is not None:
            self._noise.set_state(noise)
        else:
            self._pending_noise_state = noise.clone()  # applied once the device is known

    # -- public API ----------------------------------------------------------------

    @property
    def soft_targets(self) -> bool:
        return self.cfg.soft_targets

    @torch.no_grad()
    def normalize(self, images_uint8: Tensor) -> Tensor:
        """Plain (eval-time) normalisation: uint8 -> (x / 255 - mean) / std."""
        return self._normalize(self._to_float(images_uint8))

    @torch.no_grad()
    def __call__(self, images_uint8: Tensor, labels: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        """uint8 [B,3,H,W] -> (normalised float32 [B,3,H,W], targets).

        Targets are int64 class ids unless mixup/cutmix/label smoothing is on,
        then float [B, num_classes] rows summing to 1. ``groups``: the images are
        that many batches of equal size (vitboost.batches), each mixed on its own.
        """
        cfg = self.cfg
        if images_uint8.shape[0] % groups:
            raise ValueError(f"{images_uint8.shape[0]} images do not split into {groups} equal batches")
        x = self._to_float(images_uint8)
        dev = x.device
        noise_gen = self._noise_generator(dev)
        labels = labels.to(dev, torch.long, non_blocking=True)

        ra = self._draw_randaug(x.shape[0]) if cfg.randaug_n > 0 else None
        x = self._geometry(x, ra)
        if cfg.color_jitter > 0:
            x = self._color_jitter(x)
        if ra is not None:
            x = self._randaug_color(x, ra)
        x = self._normalize(x)
        if cfg.random_erase > 0:
            x = self._random_erase(x, noise_gen)
        if not cfg.soft_targets:
            return x, labels
        lam = torch.ones(groups)
        if cfg.mixes and x.shape[0] > groups:
            x, lam = self._mix(x, groups)
        return x, self._targets(labels, lam)

    # -- helpers -----------------------------------------------------------------------

    def _to_float(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != self._mean.numel():
            raise TypeError(f"expected uint8 [B,{self._mean.numel()},H,W], got "
                            f"{images.dtype} {tuple(images.shape)}")
        return images.float().div_(255.0)

    def _mean_std(self, dev: torch.device) -> tuple[Tensor, Tensor]:
        """[1, C, 1, 1] mean/std on dev, cached: no host->device copy per batch."""
        if dev not in self._stats:
            self._stats[dev] = (self._mean.to(dev).view(1, -1, 1, 1), self._std.to(dev).view(1, -1, 1, 1))
        return self._stats[dev]

    def _normalize(self, x: Tensor) -> Tensor:
        mean, std = self._mean_std(x.device)
        return x.sub_(mean).div_(std)

    def _u(self, *shape: int) -> Tensor:
        """Uniform [0, 1) float32 on the host generator (plenty for pixel boxes)."""
        return torch.rand(shape, generator=self._host)

    @staticmethod
    def _upload(t: Tensor, dev: torch.device) -> Tensor:
        """Small host tensor -> device without a sync (pinned, non-blocking on CUDA)."""
        if dev.type == "cpu":
            return t
        if dev.type == "cuda":
            t = t.pin_memory()
        return t.to(dev, non_blocking=True)

    # -- stages ----------------------------------------------------------------------

    def _draw_randaug(self, B: int) -> dict[str, Tensor]:
        """Per (sample, slot): op index (-1 = skipped), magnitude level in [0, 1], sign."""
        cfg, n = self.cfg, self.cfg.randaug_n
        op = torch.randint(len(RANDAUG_OPS), (B, n), generator=self._host)
        op = torch.where(self._u(B, n) < cfg.randaug_p, op, torch.full_like(op, -1))
        mag = cfg.randaug_m + cfg.randaug_mstd * torch.randn((B, n), generator=self._host)
        level = mag.clamp_(0.0, 10.0) / 10.0
        sign = torch.where(self._u(B, n) < 0.5, -1.0, 1.0)
        return {"op": op, "level": level, "sign": sign}

    def _crop_boxes(self, B: int, H: int, W: int) -> tuple[Tensor, ...]:
        """timm RandomResizedCrop.get_params, vectorised: 10 tries, centre fallback.

        Returns crop (width, height, left, top) in pixels as float [B] tensors.
        """
        (s0, s1), (r0, r1) = self.cfg.scale, self.cfg.ratio
        tries = 10
        area = (s0 + (s1 - s0) * self._u(B, tries)) * (H * W)
        log_r = math.log(r0) + (math.log(r1) - math.log(r0)) * self._u(B, tries)
        aspect = _np(np.exp, log_r)
        w = _np(_sqrt_round, area * aspect).clamp_(min=1)
        h = _np(_sqrt_round, area / aspect).clamp_(min=1)
        ok = (w <= W) & (h <= H)
        first = ok.long().argmax(dim=1, keepdim=True)  # first valid try
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        top = torch.floor(self._u(B) * (H - h + 1))
        left = torch.floor(self._u(B) * (W - w + 1))
        # fallback: central crop at the nearest allowed aspect ratio
        in_ratio = W / H
        if in_ratio < r0:
            fw, fh = W, int(round(W / r0))
        elif in_ratio > r1:
            fw, fh = int(round(H * r1)), H
        else:
            fw, fh = W, H
        any_ok = ok.any(dim=1)
        w = torch.where(any_ok, w, torch.full_like(w, fw))
        h = torch.where(any_ok, h, torch.full_like(h, fh))
        top = torch.where(any_ok, top, torch.full_like(top, (H - fh) // 2))
        left = torch.where(any_ok, left, torch.full_like(left, (W - fw) // 2))
        return w, h, left, top

    def _geometry(self, x: Tensor, ra: dict[str, Tensor] | None) -> Tensor:
        """Crop, flips, rotation and RandAugment geometry in one bilinear warp.

        The per-sample matrices (pixel units centred on the image, so rotation
        and shear are not distorted by a non-square aspect) are built on the
        host and uploaded in one copy.
        """
        cfg = self.cfg
        B, _, H, W = x.shape
        dev = x.device
        crop = cfg.scale[0] < 1.0
        if not (crop or cfg.rotate > 0 or ra is not None):  # flips alone: exact, no resampling
            for p, dim in ((cfg.hflip, 3), (cfg.vflip, 2)):
                if p > 0:
                    idx = (self._u(B) < p).nonzero().squeeze(1)
                    if idx.numel():
                        idx = self._upload(idx, dev)
                        x.index_copy_(0, idx, x.index_select(0, idx).flip(dim))
            return x

        one, zero = torch.ones(B), torch.zeros(B)
        if crop:
            # Map the outer output pixel centres onto the crop's outer pixel
            # centres, so bilinear taps never leave the crop (no edge bleed).
            w, h, left, top = self._crop_boxes(B, H, W)
            m = _affine((w - 1) / max(W - 1, 1), zero, zero, (h - 1) / max(H - 1, 1),
                        left + w / 2 - W / 2, top + h / 2 - H / 2)
        else:
            m = torch.eye(3).expand(B, 3, 3)
        if cfg.hflip > 0 or cfg.vflip > 0:
            sx = torch.where(self._u(B) < cfg.hflip, -one, one) if cfg.hflip > 0 else one
            sy = torch.where(self._u(B) < cfg.vflip, -one, one) if cfg.vflip > 0 else one
            m = m @ _affine(sx, zero, zero, sy, zero, zero)
        fill_needed = cfg.rotate > 0
        if cfg.rotate > 0:
            deg = (2 * self._u(B) - 1) * cfg.rotate
            m = m @ _rotation(deg)
        if ra is not None:  # timm: rotate 30 deg, shear 0.3, translate 0.45 of size, at level 1
            geo = [_OP[k] for k in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")]
            fill_needed = fill_needed or bool(torch.isin(ra["op"], torch.tensor(geo)).any())
            for k in range(cfg.randaug_n):
                op, v = ra["op"][:, k], ra["level"][:, k] * ra["sign"][:, k]
                pick = lambda name, amount: torch.where(op == _OP[name], v * amount, zero)  # noqa: E731
                shx, shy = pick("ShearX", 0.3), pick("ShearY", 0.3)
                tx, ty = pick("TranslateX", 0.45 * W), pick("TranslateY", 0.45 * H)
                rad = pick("Rotate", math.radians(30.0))
                cos, sin = _np(np.cos, rad), _np(np.sin, rad)
                # one op per slot, so rotation, shear and translation simply add up
                m = m @ _affine(cos, shx - sin, shy + sin, cos, tx, ty)
        if crop or cfg.rotate > 0:
            return self._warp(x, m, fill_needed)
        # only flips and RandAugment geometry: resample just the samples that move
        idx = (m != torch.eye(3, dtype=m.dtype)).flatten(1).any(1).nonzero().squeeze(1)
        if idx.numel():
            idx_dev = self._upload(idx, dev)
            x.index_copy_(0, idx_dev, self._warp(x.index_select(0, idx_dev), m[idx], fill_needed))
        return x

    def _warp(self, x: Tensor, m: Tensor, fill: bool) -> Tensor:
        """One bilinear grid_sample of x by host matrices m [B, 3, 3]."""
        H, W = x.shape[-2:]
        grid = _affine_grid(self._upload(_theta(m, H, W), x.device), H, W)
        if fill:
            # Uncovered areas get the fill colour: sample (x - fill) with zero
            # padding, add fill back (edges blend smoothly into the fill).
            value = self._mean_std(x.device)[0]
            out = F.grid_sample(x.sub_(value), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
            return out.add_(value)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _color_jitter(self, x: Tensor) -> Tensor:
        """torchvision ColorJitter(b, c, s) with factors U[max(0, 1-s), 1+s], fixed order."""
        s, B = self.cfg.color_jitter, x.shape[0]
        lo = max(0.0, 1.0 - s)
        f = self._upload(lo + (1.0 + s - lo) * self._u(3, B), x.device)
        return _saturation(_contrast(_brightness(x, f[0]), f[1]), f[2])

    def _randaug_color(self, x: Tensor, ra: dict[str, Tensor]) -> Tensor:
        """RandAugment colour ops, each run only on the samples that drew it.

        The host knows the selections: per slot it sorts samples by op, and all
        index lists and magnitudes go to the device in two copies; each op is
        then gather -> op -> scatter on its own samples.
        """
        lv, sg = ra["level"], ra["sign"]
        enh = 1.0 + sg * lv * 0.9   # timm *Increasing enhance factors in [0.1, 1.9]
        zero = torch.zeros_like(lv)
        fns = {   # op -> (fn, per-sample parameter [B, n] or None)
            "AutoContrast": (_autocontrast, None),
            "Equalize": (_equalize, None),
            "Invert": (_invert, None),
            "Posterize": (_posterize, 4.0 - torch.floor(4.0 * lv)),  # keep 4 - int(4 level) bits
            "Solarize": (_solarize, (256.0 - torch.floor(256.0 * lv)) / 255.0),
            "SolarizeAdd": (_solarize_add, torch.floor(110.0 * lv) / 255.0),
            "Color": (_saturation, enh),
            "Contrast": (_contrast, enh),
            "Brightness": (_brightness, enh),
            "Sharpness": (_sharpness, enh),
        }
        # table[op + 1] = that op's parameter for every (sample, slot); row 0 = skipped
        rows = [fns[name][1] if name in fns else None for name in RANDAUG_OPS]
        table = torch.stack([zero] + [zero if r is None else r for r in rows])
        plan, idx_parts, par_parts, n = [], [], [], 0
        for k in range(self.cfg.randaug_n):
            op = ra["op"][:, k] + 1
            order = torch.argsort(op, stable=True)
            ends = torch.bincount(op, minlength=len(RANDAUG_OPS) + 1).cumsum(0).tolist()
            idx_parts.append(order)
            par_parts.append(table[op[order], order, k])
            for name, (fn, par) in fns.items():
                t = _OP[name] + 1
                if ends[t] > ends[t - 1]:
                    plan.append((fn, par is not None, n + ends[t - 1], n + ends[t]))
            n += order.numel()
        if not plan:
            return x
        idx_dev = self._upload(torch.cat(idx_parts), x.device)
        par_dev = self._upload(torch.cat(par_parts), x.device)
        for fn, has_par, a, b in plan:
            idx = idx_dev[a:b]
            sub = x.index_select(0, idx)
            x.index_copy_(0, idx, fn(sub, par_dev[a:b]) if has_par else fn(sub))
        return x

    def _random_erase(self, x: Tensor, noise_gen: torch.Generator) -> Tensor:
        """timm RandomErasing(mode='pixel', max_count=1): one box of N(0, 1) noise."""
        B, C, H, W = x.shape
        tries = 10
        do = self._u(B) < self.cfg.random_erase
        area = (0.02 + (1 / 3 - 0.02) * self._u(B, tries)) * (H * W)
        lr = math.log(0.3), math.log(1 / 0.3)
        aspect = _np(np.exp, lr[0] + (lr[1] - lr[0]) * self._u(B, tries))
        h = _np(_sqrt_round, area * aspect)
        w = _np(_sqrt_round, area / aspect)
        ok = (w < W) & (h < H)
        first = ok.long().argmax(dim=1, keepdim=True)
        h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
        top = torch.floor(self._u(B) * (H - h + 1))
        left = torch.floor(self._u(B) * (W - w + 1))
        idx = (do & ok.any(dim=1)).nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        box = self._upload(torch.stack([idx.float(), top[idx], top[idx] + h[idx],
                                        left[idx], left[idx] + w[idx]]).long(), x.device)
        ys = torch.arange(H, device=x.device).view(1, 1, H, 1)
        xs = torch.arange(W, device=x.device).view(1, 1, 1, W)
        b = box[1:].view(4, -1, 1, 1, 1)
        inside = (ys >= b[0]) & (ys < b[1]) & (xs >= b[2]) & (xs < b[3])   # [k, 1, H, W]
        noise = torch.randn((idx.numel(), C, H, W), generator=noise_gen, device=x.device)
        sel = box[0]
        x.index_copy_(0, sel, torch.where(inside, noise, x.index_select(0, sel)))
        return x

    def _beta(self, alpha: float) -> float:
        """Beta(alpha, alpha) from two gammas on the host generator."""
        g = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=self._host)
        return float(g[0] / g.sum()) if g.sum() > 0 else 0.5

    def _mix(self, x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """timm Mixup(mode='batch', correct_lam=True) in each of ``groups`` batches: mix it with itself flipped.

        The decisions, lambdas and boxes are drawn on the host, as in timm, one batch after the other;
        the device then blends every batch at once with one weight map (mixup: 1 - lam everywhere,
        cutmix: 1 in the box, no mix: 0), so nothing waits on the device. Returns the lambdas [groups].
        """
        cfg = self.cfg
        _, C, H, W = x.shape
        rows, lams = [], []
        for _ in range(groups):
            box, weight, lam = (0, H, 0, W), 0.0, 1.0
            if float(self._u(1)) < cfg.mix_prob:
                if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
                    use_cut = float(self._u(1)) < 0.5   # timm switch_prob
                else:
                    use_cut = cfg.cutmix_alpha > 0
                if not use_cut:
                    lam = self._beta(cfg.mixup_alpha)
                    weight = 1.0 - lam
                else:
                    cut_rat = math.sqrt(1.0 - self._beta(cfg.cutmix_alpha))   # timm rand_bbox
                    ch, cw = int(H * cut_rat), int(W * cut_rat)
                    cy, cx = int(self._u(1) * H), int(self._u(1) * W)
                    box = (min(max(cy - ch // 2, 0), H), min(max(cy + ch // 2, 0), H),
                           min(max(cx - cw // 2, 0), W), min(max(cx + cw // 2, 0), W))
                    weight, lam = 1.0, 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / (H * W)  # area-corrected
            rows.append((*box, weight))
            lams.append(lam)
        if all(r[-1] == 0.0 for r in rows):
            return x, torch.ones(groups)
        p = self._upload(torch.tensor(rows), x.device).view(groups, 5, 1, 1)
        ys = torch.arange(H, device=x.device).view(1, H, 1)
        xs = torch.arange(W, device=x.device).view(1, 1, W)
        inside = (ys >= p[:, 0]) & (ys < p[:, 1]) & (xs >= p[:, 2]) & (xs < p[:, 3])  # [groups, H, W]
        weight = (inside * p[:, 4]).view(groups, 1, 1, H, W)
        batches = x.view(groups, -1, C, H, W)
        batches.lerp_(batches.flip(1), weight)  # weight 0 or 1 gives x or its partner exactly
        return x, torch.tensor(lams)

    def _targets(self, labels: Tensor, lam: Tensor) -> Tensor:
        """timm mixup_target: smoothed one-hot, mixed with the flipped batch by each batch's lam."""
        K, s = self.num_classes, self.cfg.label_smoothing
        off = s / K
        y = torch.full((labels.shape[0], K), off, device=labels.device)
        y.scatter_(1, labels.view(-1, 1), 1.0 - s + off)
        if bool((lam == 1.0).all()):
            return y
        batches = y.view(lam.numel(), -1, K)
        lam = self._upload(lam, y.device).view(-1, 1, 1)
        return (batches * lam).add_(batches.flip(1) * (1.0 - lam)).view(-1, K)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy for class ids or soft targets [B, K] (mixup/smoothing).

    Soft targets are computed in float32 so bf16 logits do not lose precision.
    """
    if not targets.is_floating_point():
        return F.cross_entropy(logits, targets)
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(targets.float() * logp).sum(dim=-1).mean()
